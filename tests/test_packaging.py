"""The top-level backends/ folder must import as mimsparse.backends in editable and regular installs."""
import subprocess
import sys

import pytest

import mimsparse.backends
from tests.conftest import ROOT


def test_editable_install_maps_backends_folder():
    assert mimsparse.backends.__file__.startswith(str(ROOT / "backends"))


@pytest.mark.slow
def test_regular_install_ships_backends(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    code = ("import mimsparse.backends.dense as d, mimsparse.encoder; "
            "assert 'site' in d.__file__, d.__file__; print(d.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout
