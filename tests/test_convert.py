"""Converter: key/shape mapping for all nine sizes, numerical equality, and the CLI end to end."""
import pytest
import timm
import torch

from mimsparse.errors import ConversionError
from mimsparse.models.convnextv2 import encoder_to_timm
from mimsparse.models.convnextv2 import SparseConvNeXtV2
from mimsparse.models.convnextv2 import CONVNEXTV2_SPECS
from tests.conftest import run_tool, tiny_overrides


@pytest.mark.parametrize("name", list(CONVNEXTV2_SPECS))
def test_every_size_maps_onto_timm_keys_and_shapes(name):
    with torch.device("meta"):
        ours = encoder_to_timm(SparseConvNeXtV2.from_name(name).state_dict(), name)
        ref = {k: v for k, v in timm.create_model(name).state_dict().items() if not k.startswith("head.")}
    assert ours.keys() == ref.keys()
    assert all(ours[k].shape == ref[k].shape for k in ref)


def test_foreign_keys_are_refused():
    with pytest.raises(ConversionError, match="unexpected encoder parameter"):
        encoder_to_timm({"decoder.proj.weight": torch.zeros(1)}, "convnextv2_atto")


@pytest.mark.slow
def test_pretrain_then_convert_cli_loads_strict_into_timm(photo_dir, tmp_path):
    run_tool("pretrain.py", "--data", str(photo_dir), "--no-progress", *tiny_overrides(tmp_path / "run", **{"train.max_steps": 2}))
    ckpt = tmp_path / "run" / "checkpoint-0000002.pth"
    out = tmp_path / "dense.pth"
    proc = run_tool("convert_to_dense.py", str(ckpt), "-o", str(out), "--num-classes", "7")
    assert "max relative error" in proc.stdout
    error = float(proc.stdout.split("mask ratio 0: ")[1].split()[0])
    assert error < 1e-4
    model = timm.create_model("convnextv2_atto", num_classes=7)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    # the converted weights are the trained ones, not a fresh model
    trained = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(model.stages[2].blocks[1].mlp.grn.weight, trained["encoder.stages.2.blocks.1.mlp.grn.weight"])
    assert trained["encoder.stages.2.blocks.1.mlp.grn.weight"].abs().sum() > 0


def test_converter_cli_errors(tmp_path):
    proc = run_tool("convert_to_dense.py", str(tmp_path / "nope.pth"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    proc = run_tool("convert_to_dense.py", str(tmp_path / "junk.pth"), check=False)
    assert proc.returncode == 2 and "is not a torch checkpoint (neither a zip nor a pickle file)" in proc.stderr
    assert "earlier checkpoint" not in proc.stderr  # there is none to use: it is another kind of file
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    proc = run_tool("convert_to_dense.py", str(tmp_path / "other.pth"), check=False)
    assert proc.returncode == 2 and "not a mimsparse pretraining checkpoint" in proc.stderr


def test_model_without_grn_converts_to_timm_with_identity_grn():
    """model.use_grn=false: the converted timm model (zero GRN) equals the GRN-free sparse encoder."""
    from mimsparse.config import config_from_dict
    from mimsparse.convert import convert_checkpoint
    from tests.helpers import randomize_

    cfg = config_from_dict({"model": {"use_grn": False}})
    encoder = randomize_(SparseConvNeXtV2.from_name("convnextv2_atto", use_grn=False))
    assert not any(".grn." in k for k in encoder.state_dict())
    ckpt = {"model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}, "config": cfg.to_dict()}
    sd, name, error = convert_checkpoint(ckpt, num_classes=5)
    assert error < 1e-4
    grn = [k for k in sd if ".mlp.grn." in k]
    assert len(grn) == 2 * 12 and all(sd[k].abs().sum() == 0 for k in grn)
    model = timm.create_model(name, num_classes=5)
    model.load_state_dict(sd, strict=True)
    # independent check: with GRN weights non-zero the outputs would differ
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    ref = model.forward_features(x)
    with torch.no_grad():
        model.stages[0].blocks[0].mlp.grn.weight.fill_(1.0)
    assert not torch.allclose(model.forward_features(x), ref)
