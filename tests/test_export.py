"""Weights-only exports (mimsparse/convert/export.py, tools/convert_to_dense.py): safetensors by default
with metadata in the header, bare .pth on request, a timm folder timm loads offline, the printed load
lines (executed here), atomic writes with the umask's file mode, and every reader accepting safetensors."""
import os
import re
import stat

import pytest
import timm
import torch
from safetensors import safe_open

from mimsparse.convert import convert_checkpoint
from mimsparse.convert.export import load_weights_file, save_timm_folder, save_weights
from mimsparse.evaluate.initial_weights import build_model
from mimsparse.train.checkpoint import load_checkpoint
from tests.conftest import ROOT, run_tool
from tests.test_finetune import pretrained_checkpoints


@pytest.fixture
def pretrained(tmp_path_factory, photo_dir):
    return pretrained_checkpoints(tmp_path_factory, photo_dir)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def run_load_lines(stdout: str) -> list:
    """Executes every 'load with:' / 'or:' line the tool printed, in a fresh namespace, offline."""
    import safetensors.torch  # noqa: F401  (the lines name it)
    import torchvision

    lines = re.findall(r"^\s*(?:load with|or): (.*)$", stdout, flags=re.M)
    assert lines, stdout
    models = []
    for line in lines:
        namespace = {"torch": torch, "timm": timm, "torchvision": torchvision, "safetensors": safetensors}
        exec(f"result = {line}", namespace)
        models.append(namespace["result"])
    return models


def test_default_export_is_safetensors_with_metadata(pretrained, tmp_path, umask_022):
    ckpt = tmp_path / "run" / "checkpoint-0000001.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(pretrained["ckpt"].read_bytes())
    proc = run_tool("convert_to_dense.py", str(ckpt), "--num-classes", "10")
    out = ckpt.with_name("checkpoint-0000001-timm.safetensors")
    assert out.is_file() and f"wrote {out}" in proc.stdout and "safetensors" in proc.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert not list(out.parent.glob(".*.tmp"))
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    error = float(proc.stdout.split("mask ratio 0: ")[1].split()[0])
    assert meta["model_name"] == "convnextv2_atto" and meta["num_classes"] == "10"
    assert meta["source_checkpoint"] == str(ckpt) and meta["source_step"] == "1"
    assert float(meta["conversion_error"]) == pytest.approx(error, rel=0.01) and error < 1e-4
    assert meta["head"].startswith("fresh") and meta["format"] == "pt"
    # the weights are the conversion's, and the printed line loads them strictly into timm
    ref, _, _ = convert_checkpoint(load_checkpoint(ckpt), num_classes=10)
    sd, _ = load_weights_file(out)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    (model,) = run_load_lines(proc.stdout)
    assert not model.missing_keys and not model.unexpected_keys  # load_state_dict's result, strict


def test_pth_on_request_and_encoder_only(pretrained, tmp_path):
    for args, out in [(["-o", str(tmp_path / "a.pth")], tmp_path / "a.pth"),
                      (["-o", str(tmp_path / "b.bin"), "--format", "pth"], tmp_path / "b.bin")]:
        proc = run_tool("convert_to_dense.py", str(pretrained["ckpt"]), "--num-classes", "3", *args)
        sd = torch.load(out, weights_only=True)  # a bare state dict
        assert "head.fc.weight" in sd and sd["head.fc.weight"].shape == (3, 320)
        assert "bare torch state dict" in proc.stdout and f"torch.load('{out}', weights_only=True)" in proc.stdout
        run_load_lines(proc.stdout)
    proc = run_tool("convert_to_dense.py", str(pretrained["ckpt"]), "--num-classes", "0", "-o",
                    str(tmp_path / "enc.safetensors"))
    assert "encoder only" in proc.stdout
    (result,) = run_load_lines(proc.stdout)
    features = timm.create_model("convnextv2_atto", num_classes=0)
    features.load_state_dict(load_weights_file(tmp_path / "enc.safetensors")[0], strict=True)
    assert not any(k.startswith("head.fc") for k in load_weights_file(tmp_path / "enc.safetensors")[0])


def test_timm_folder_loads_offline_through_pretrained_cfg(pretrained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "atto-timm"
    proc = run_tool("convert_to_dense.py", str(pretrained["ckpt"]), "--num-classes", "4", "--format", "timm",
                    "-o", str(folder))
    config = __import__("json").loads((folder / "config.json").read_text())
    assert config["architecture"] == "convnextv2_atto" and config["num_classes"] == 4
    # the size the run pretrained at, not timm's default 224 for the architecture
    size = torch.load(pretrained["ckpt"], weights_only=True)["config"]["data"]["img_size"]
    assert config["pretrained_cfg"]["num_classes"] == 4 and config["pretrained_cfg"]["input_size"] == [3, size, size]
    assert size != 224
    sd, meta = load_weights_file(folder / "model.safetensors")
    assert meta["model_name"] == "convnextv2_atto"
    models = run_load_lines(proc.stdout)
    assert len(models) == 2 and "pretrained_cfg_overlay=dict(file=" in proc.stdout
    x = torch.randn(1, 3, 64, 64)
    reference = timm.create_model("convnextv2_atto", num_classes=4).eval()
    reference.load_state_dict(sd, strict=True)
    for model in models:  # every weight, head included, came from the export
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
        assert torch.allclose(model.eval()(x), reference(x))


def test_transformers_folder_loads_into_transformers_with_timms_numbers(pretrained, tmp_path):
    """--format transformers: ConvNextV2ForImageClassification.from_pretrained loads every tensor (none
    missing or unexpected) and gives the logits of timm's model from the same conversion; with
    --num-classes 0, ConvNextV2Model gives timm's forward_features. Read back by model.init, either
    folder gives the checkpoint's encoder exactly."""
    transformers = pytest.importorskip("transformers")
    from mimsparse.api import build_model as build_sparse

    proc = run_tool("convert_to_dense.py", str(pretrained["ckpt"]), "--num-classes", "4", "--format", "transformers",
                    "-o", str(tmp_path / "hf"))
    assert f"load with: transformers.ConvNextV2ForImageClassification.from_pretrained('{tmp_path / 'hf'}')" in \
        proc.stdout
    run_tool("convert_to_dense.py", str(pretrained["ckpt"]), "--num-classes", "4", "-o",
             str(tmp_path / "t.safetensors"))
    run_tool("convert_to_dense.py", str(pretrained["ckpt"]), "--num-classes", "0", "--format", "transformers",
             "-o", str(tmp_path / "hf0"))
    reference = timm.create_model("convnextv2_atto", num_classes=4).eval()
    reference.load_state_dict(load_weights_file(tmp_path / "t.safetensors")[0], strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for folder, cls, output, expected in (("hf", "ConvNextV2ForImageClassification", lambda m: m(x).logits, reference),
                                          ("hf0", "ConvNextV2Model", lambda m: m(x).last_hidden_state,
                                           reference.forward_features)):
        model, info = getattr(transformers, cls).from_pretrained(tmp_path / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        with torch.no_grad():
            ours, theirs = output(model.eval()), expected(x)
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    encoder = load_checkpoint(pretrained["ckpt"])["model"]
    for folder in ("hf", "hf0"):  # ConvNextV2Model's keys have no "convnextv2." prefix: read back as well
        sparse = build_sparse("convnextv2_atto", init=tmp_path / folder)
        assert all(torch.equal(v, encoder[f"encoder.{k}"]) for k, v in sparse.encoder.state_dict().items())


def test_atomic_write_keeps_the_old_file_and_follows_the_umask(tmp_path):
    sd = {"w": torch.arange(6.0).view(2, 3)}
    out = tmp_path / "w.safetensors"
    old = os.umask(0o027)
    try:
        save_weights(sd, out, {"num_classes": 2})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    loaded, meta = load_weights_file(out)
    assert torch.equal(loaded["w"], sd["w"]) and meta["num_classes"] == "2"
    with pytest.raises(AttributeError):  # a failing write (not a tensor) leaves the previous export intact
        save_weights({"w": "not a tensor"}, out)
    assert torch.equal(load_weights_file(out)[0]["w"], sd["w"]) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(Exception, match="truncated or not a safetensors file"):
        (tmp_path / "torn.safetensors").write_bytes(out.read_bytes()[:40])
        load_weights_file(tmp_path / "torn.safetensors")


def test_readers_accept_safetensors(pretrained, tmp_path):
    """finetune / linear probe (build_model) and feature collapse read a .safetensors export exactly as the .pth."""
    dense = torch.load(pretrained["dense"], weights_only=True)
    save_weights(dense, tmp_path / "dense.safetensors")
    a, _, _ = build_model(str(pretrained["dense"]), "convnextv2_atto", 5, seed=0, head_init_scale=0.001)
    b, _, _ = build_model(str(tmp_path / "dense.safetensors"), "convnextv2_atto", 5, seed=0, head_init_scale=0.001)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    proc = run_tool("feature_collapse.py", str(tmp_path / "dense.safetensors"), "--model", "convnextv2_atto",
                    "--img-size", "64", "--num-images", "2", "-o", str(tmp_path / "c.png"))
    assert "wrote" in proc.stdout and (tmp_path / "c.png").is_file()


def test_head_from_safetensors_metadata_is_fresh_like_the_checkpoint_route(pretrained, tmp_path):
    """A conversion's head, said fresh by the header, starts exactly as when finetuning from the pretraining
    checkpoint: drawn from the seed and scaled by head_init_scale."""
    run_tool("convert_to_dense.py", str(pretrained["ckpt"]), "--num-classes", "2", "-o", str(tmp_path / "c.safetensors"))
    from_export, _, notes = build_model(str(tmp_path / "c.safetensors"), "convnextv2_atto", 2, seed=3,
                                        head_init_scale=0.001)
    from_ckpt, _, _ = build_model(str(pretrained["ckpt"]), None, 2, seed=3, head_init_scale=0.001)
    assert all(torch.equal(x, y) for x, y in zip(from_export.state_dict().values(), from_ckpt.state_dict().values()))
    assert from_export.head.fc.weight.abs().max() < 0.001 * 0.1


def test_official_dense_export_is_wrapped_and_its_timm_line_loads(pretrained, tmp_path):
    out = tmp_path / "official-dense.pth"
    proc = run_tool("convert_official.py", "export", "--checkpoint", str(pretrained["ckpt"]), "-o", str(out),
                    "--dense", "--num-classes", "3")
    assert "wrapped as {'model': state_dict}" in proc.stdout
    assert (f"convnextv2_atto(num_classes=3); model.load_state_dict(torch.load('{out}', weights_only=True)['model'])"
            in proc.stdout)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    wrapped = torch.load(out, weights_only=True)
    assert list(wrapped) == ["model"]
    timm_line = proc.stdout.split("       or: ")[1].strip()
    model = eval(timm_line, {"timm": timm})
    reference = timm.create_model("convnextv2_atto", num_classes=3)
    reference.load_state_dict(timm.models.convnext.checkpoint_filter_fn(wrapped["model"], reference), strict=True)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
