"""The library API (mimsparse/__init__.py): the README's "Library API" snippet runs as printed, with the
checkpoint path it names, and its results agree with the pieces it wraps; the import itself stays lazy."""
import re
import subprocess
import sys

import torch

from tests.conftest import ROOT
from tests.test_finetune import pretrained_checkpoints


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Library API\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_readme_snippet_runs(tmp_path_factory, photo_dir, tmp_path, monkeypatch):
    ckpt = pretrained_checkpoints(tmp_path_factory, photo_dir)["ckpt"]
    code = readme_snippet()
    path = re.search(r'path = "([^"]+)"', code).group(1)
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_bytes(ckpt.read_bytes())
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md (Library API)", "exec"), ns)
    assert ns["pred"].shape == (2, 49, 32 * 32 * 3) and ns["visible"].shape == (2, 7, 7)
    assert ns["visible"].sum().item() == 2 * round(49 * 0.4)  # default mask ratio 0.6
    assert ns["feats"].shape == (2, 320, 7, 7) and torch.isfinite(ns["loss"])
    assert (ns["feats"].abs().sum(1) > 0).eq(ns["visible"]).all()  # zero exactly at the masked patches
    # the converted classifier holds the pretrained weights, and agrees with the pretrained sparse encoder
    trained = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(ns["classifier"].stem[0].weight, trained["encoder.stem_conv.weight"])
    x = torch.randn(1, 3, 64, 64)
    dense = ns["classifier"].eval().forward_features(x)
    sparse = ns["pretrained"].encoder(x, torch.ones(1, 2, 2, dtype=torch.bool))
    assert torch.allclose(dense, sparse, atol=1e-4 * dense.abs().max().item())


def test_import_is_lazy_and_names_resolve():
    code = ("import sys, mimsparse; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
            "names = [getattr(mimsparse, n) for n in mimsparse.__all__]; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    import mimsparse
    from mimsparse.backends import get_backend
    from mimsparse.convert import convert_checkpoint

    assert mimsparse.get_backend is get_backend and mimsparse.convert_checkpoint is convert_checkpoint
    model = mimsparse.build_model("resnet18", overrides=["model.decoder=spark", "mask.ratio=0.5"])
    assert type(model.encoder).__name__ == "SparseResNet" and model.mask_ratio == 0.5
    cfg = mimsparse.load_config(ROOT / "configs" / "fcmae_atto.yaml")
    assert mimsparse.build_model(cfg).encoder.stage_dims == mimsparse.build_encoder("convnextv2_atto").stage_dims
