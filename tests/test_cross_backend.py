"""Checkpoints do not depend on the backend: train with one, resume with another, convert to timm."""
import subprocess
import sys

import pytest
import timm
import torch

from mimsparse.backends import BackendUnavailable, get_backend
from mimsparse.train.checkpoint import load_checkpoint
from mimsparse.config import load_config
from mimsparse.convert import convert_checkpoint
from mimsparse.train.build import Pretrainer
from tests.conftest import tiny_overrides

@pytest.mark.spconv
@pytest.mark.parametrize("first,second", [("spconv", "dense"), ("dense", "spconv")])
def test_train_resume_on_other_backend_and_convert(first, second, photo_dir, tmp_path):
    def cfg(steps):
        return load_config(None, tiny_overrides(tmp_path, **{"data.path": str(photo_dir), "train.max_steps": steps}))

    ckpt = Pretrainer(cfg(3), first, show_progress=False).run()["checkpoint"]
    resumed = Pretrainer(cfg(5), second, resume=ckpt, show_progress=False)
    # the resumed model holds exactly the saved weights
    saved = load_checkpoint(ckpt)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in resumed.model.state_dict().items())
    result = resumed.run()
    assert [r["step"] for r in result["history"]] == [4, 5]
    ref = Pretrainer(cfg(5), first, show_progress=False)
    ref.load(ckpt)
    ref_losses = [r["loss"] for r in ref.run()["history"]]
    # same steps on the other backend: equal up to float summation order
    assert [r["loss"] for r in result["history"]] == pytest.approx(ref_losses, rel=1e-4)

    sd, name, error = convert_checkpoint(load_checkpoint(result["checkpoint"]), num_classes=5)
    model = timm.create_model(name, num_classes=5)
    model.load_state_dict(sd, strict=True)
    assert error < 1e-4


def test_missing_library_gives_install_hint():
    code = ("import sys; sys.modules['MinkowskiEngine'] = None; sys.modules['spconv'] = None\n"
            "import mimsparse.models.convnextv2, mimsparse.train.engine\n"
            "from mimsparse.backends import get_backend, BackendUnavailable\n"
            "for name in ('minkowski', 'spconv'):\n"
            "    try:\n"
            "        get_backend(name)\n"
            "    except BackendUnavailable as e:\n"
            "        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "build_minkowski.sh" in out.stdout and "pip install spconv-cu120" in out.stdout


def test_registry_lists_every_backend():
    for name in ("dense", "packed"):
        assert get_backend(name).name == name
    with pytest.raises(BackendUnavailable, match="dense, packed, spconv, minkowski"):
        get_backend("nope")
