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
    code = ("import mimsparse.backends.dense as d, mimsparse.models.build, mimsparse.convert, mimsparse.train.engine, "
            "mimsparse.evaluate.finetune; "
            "assert 'site' in d.__file__, d.__file__; print(d.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout


def _package_modules() -> list[str]:
    names = []
    for folder, package in ((ROOT / "mimsparse", "mimsparse"), (ROOT / "backends", "mimsparse.backends")):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join((package, *parts)))
    return names


def test_every_module_imports_on_its_own():
    """No import cycle: each module imports first, with none of the package loaded before it (libraries
    such as torch stay loaded; only mimsparse's own modules are dropped between imports)."""
    modules = [m for m in _package_modules() if m not in ("mimsparse.backends.spconv", "mimsparse.backends.minkowski")]
    for optional, lib in (("mimsparse.backends.spconv", "spconv"), ("mimsparse.backends.minkowski", "MinkowskiEngine")):
        if subprocess.run([sys.executable, "-c", f"import {lib}"], capture_output=True).returncode == 0:
            modules.append(optional)
    code = ("import importlib, sys, traceback\n"
            f"failed = []\n"
            f"for name in {modules!r}:\n"
            "    for loaded in [m for m in sys.modules if m == 'mimsparse' or m.startswith('mimsparse.')]:\n"
            "        del sys.modules[loaded]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception:\n"
            "        failed.append(name + ': ' + traceback.format_exc().splitlines()[-1])\n"
            "print('\\n'.join(failed))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
    assert len(modules) > 30


def test_model_names_are_dispatched_by_the_registry_only():
    """Nothing outside the registry decides a model's family from its name."""
    pattern = "RESNET_" + r"ARCHS|startswith\([\"'](resnet|convnextv2)"  # split: this line must not match itself
    out = subprocess.run(["git", "grep", "-n", "-E", pattern, "--", "*.py", "tools", "scripts"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout == "", out.stdout
