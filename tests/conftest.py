import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

# The one place that turns a library marker into a skip when the library is missing (tests/helpers.
# backend_param puts the marker on every test parametrised with that backend).
LIBRARY_MARKERS = {"spconv": ("spconv", "pip install spconv-cu120, or `make setup`"),
                   "minkowski": ("MinkowskiEngine", "bash scripts/build_minkowski.sh .venv/bin/python, or `make setup`")}


def pytest_runtest_setup(item):
    for marker, (module, install) in LIBRARY_MARKERS.items():
        if item.get_closest_marker(marker) is not None and importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({install})")


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Six real photos (scikit-image's bundled ones), downsized so tests stay fast."""
    from PIL import Image

    from mimsparse.train.data import bundled_photo_paths

    folder = tmp_path_factory.mktemp("photos")
    for path in bundled_photo_paths()[:6]:
        with Image.open(path) as img:
            img.convert("RGB").resize((96, 96)).save(folder / f"{path.stem}.png")
    return folder


def run_tool(script: str, *args: str, check: bool = True):
    """Run tools/<script> as a user would; returns the CompletedProcess."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_overrides(out_dir, **extra) -> list[str]:
    """Config overrides for a seconds-long run on 64x64 crops."""
    values = {"data.img_size": 64, "data.repeat": 2, "train.batch_size": 4, "train.epochs": 2,
              "model.decoder_dim": 64, "optim.base_lr": 1e-2, "train.output_dir": str(out_dir)}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
