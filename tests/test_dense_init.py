"""model.init: the sparse encoder started from dense timm / torchvision / official weights is the dense
network (forward and gradients, every backend), export(init(w)) == w, every format on disk loads, and
every bad file is one line."""
import argparse

import pytest
import timm
import torch
import torchvision

from mimsparse.api import build_model
from mimsparse.convert.dense_init import init_from_dense
from mimsparse.errors import CheckpointError, ConversionError
from mimsparse.models.registry import family_of, model_names
from mimsparse.models.resnet import SparseResNet, torchvision_features
from tests.conftest import run_tool
from tests.helpers import backend_or_skip, backend_param, randomize_, rel_err

BACKENDS = [backend_param(name) for name in ("dense", "packed", "spconv", "minkowski")]


@torch.no_grad()
def random_dense(name: str, seed: int = 0):
    """(the dense model, its last-feature-map function) with random weights everywhere, BatchNorm running
    statistics included (fresh ones are 0 / 1 and would hide a statistic that did not load)."""
    if family_of(name).encoder is SparseResNet:
        model = torchvision.models.get_model(name, num_classes=10)
        features = lambda x: torchvision_features(model, x)  # noqa: E731
    else:
        model = timm.create_model(name, num_classes=10)
        features = model.forward_features
    randomize_(model, seed, std=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
    return model.eval(), features


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["convnextv2_atto", "resnet18"])
def test_init_gives_the_dense_models_features_and_gradients(name, backend, tmp_path):
    """Eval mode (BatchNorm from the loaded running statistics), then train mode (batch statistics,
    which also move the running ones the same way in both)."""
    backend_or_skip(backend)
    dense, features = random_dense(name)
    torch.save(dense.state_dict(), tmp_path / "w.pth")
    model = build_model(name, backend=backend, init=tmp_path / "w.pth")
    family = family_of(name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 96, generator=g)
    visible = torch.ones(2, 2, 3, dtype=torch.bool)  # mask ratio 0
    for train in (False, True):
        model.train(train), dense.train(train)
        model.zero_grad(), dense.zero_grad()
        xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, ref = model.encoder(xs, visible), features(xd)
        assert ours.shape == ref.shape and rel_err(ours, ref) < 1e-4, train
        weight = torch.randn(ref.shape, generator=g)
        (ours * weight).sum().backward()
        (ref * weight).sum().backward()
        assert rel_err(xs.grad, xd.grad) < 1e-4, train
        # parameter gradients and buffers, mapped to our names by the family's reverse table
        dense_grads = {k: p.grad for k, p in dense.named_parameters() if not k.startswith(family.dense_head)}
        ref_grads = family.from_dense(dense_grads, name)
        our_grads = {k: p.grad for k, p in model.encoder.named_parameters()}
        assert our_grads.keys() == ref_grads.keys()
        worst = max(rel_err(our_grads[k], ref_grads[k]) for k in our_grads)
        assert worst < 1e-3, (train, worst)
        ref_buffers = family.from_dense(dict(dense.named_buffers()), name)
        assert all(rel_err(b.float(), ref_buffers[k].float()) < 1e-5 for k, b in model.encoder.named_buffers())


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny", "resnet18", "resnet50"])
def test_export_of_init_is_the_file_exactly(name, tmp_path):
    """to_dense(init(w)) == w, bit for bit, BatchNorm statistics included (the classifier is fresh)."""
    dense, _ = random_dense(name)
    w = dense.state_dict()
    torch.save(w, tmp_path / "w.pth")
    model = build_model(name, init=tmp_path / "w.pth")
    family = family_of(name)
    back = family.to_dense(model.encoder.state_dict(), name, 10)
    body = [k for k in w if not k.startswith(family.dense_head)]
    assert sorted(body) == sorted(k for k in back if not k.startswith(family.dense_head))
    assert all(torch.equal(back[k], w[k]) and back[k].dtype == w[k].dtype for k in body)


def test_every_registered_model_reads_its_own_export_back():
    """Keys and shapes for every size: the reverse table undoes the export (meta tensors, no memory)."""
    from mimsparse.convert.dense_init import encoder_state_from_dense, misfit

    for name in model_names():
        family = family_of(name)
        with torch.device("meta"):
            encoder = family.encoder.from_name(name).state_dict()
            dense = timm.create_model(name).state_dict()
        ours, _, ignored = encoder_state_from_dense(dense, name)
        assert not misfit(ours, encoder), name
        assert ignored and all(k.startswith(family.dense_head) for k in ignored)


def load(path, backend="dense", name="convnextv2_atto"):
    model = build_model(name, backend=backend)
    return model, init_from_dense(model, path, name)


def test_formats_on_disk(tmp_path):
    """timm bare / FCMAE-release (head.norm, no head.fc) / safetensors / .bin / wrapped / DDP prefix / timm
    folder, the official dense and FCMAE layouts, and our own export: all load the same tensors."""
    from mimsparse.convert.export import save_timm_folder, save_weights
    from mimsparse.convert.official import encoder_to_official_dense, fcmae_to_official

    dense, _ = random_dense("convnextv2_atto")
    w = dense.state_dict()
    ref, report = load(_save(tmp_path / "bare.pth", w))
    assert report.ignored == ("head.fc", "head.norm") and report.fresh == ("decoder",)
    assert "timm ConvNeXt V2 state dict" in report.line() and report.loaded == len(ref.encoder.state_dict())
    expected = ref.encoder.state_dict()
    fcmae_release = {k: v for k, v in w.items() if not k.startswith("head.fc.")}
    save_weights(w, tmp_path / "w.safetensors")
    save_timm_folder(w, tmp_path / "folder", "convnextv2_atto", 10)
    ours = build_model("convnextv2_atto", overrides=["model.decoder_dim=64"])
    ours.encoder.load_state_dict(expected)
    files = {
        "fcmae.pth": fcmae_release, "w.bin": w, "wrapped.pt": {"state_dict": {f"module.{k}": v for k, v in w.items()}},
        "official_dense.pth": {"model": encoder_to_official_dense(expected, num_classes=10), "epoch": 3},
        "official_fcmae.pth": {"model": fcmae_to_official(ours.state_dict()),
                               "args": argparse.Namespace(mask_ratio=0.6)},  # as main_pretrain.py saves it
        "checkpoint.pth": {"model": ours.state_dict(), "config": {"model": {"name": "convnextv2_atto"}}},
    }
    for name, contents in files.items():
        _save(tmp_path / name, contents)
    sources = {"fcmae.pth": "timm", "w.safetensors": "timm", "folder": "model folder, architecture convnextv2_atto",
               "w.bin": "timm", "wrapped.pt": "timm", "official_dense.pth": "official ConvNeXt V2 dense",
               "official_fcmae.pth": "official ConvNeXt V2 FCMAE", "checkpoint.pth": "mimsparse pretraining checkpoint"}
    for name, source in sources.items():
        model, report = load(tmp_path / name)
        assert source in report.source, (name, report.line())
        got = model.encoder.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
    assert load(tmp_path / "fcmae.pth")[1].ignored == ("head.norm",)
    assert load(tmp_path / "official_dense.pth")[1].ignored == ("head", "norm")


@pytest.mark.parametrize("backend", ["dense", "packed"])
def test_a_hugging_face_transformers_folder_gives_its_models_features(backend, tmp_path):
    """The facebook/convnextv2-* layout of the Hub (transformers' ConvNextV2ForImageClassification,
    saved with save_pretrained): our encoder at mask ratio 0 gives transformers' own last hidden state;
    the pooled norm and classifier are left out; a folder of another size names the size it holds."""
    transformers = pytest.importorskip("transformers")

    def hf_folder(depths, dims, path):
        config = transformers.ConvNextV2Config(depths=depths, hidden_sizes=dims, num_labels=10)
        model = transformers.ConvNextV2ForImageClassification(config).eval()
        randomize_(model, 0, std=0.05)  # GRN starts at zero: random values so that every tensor counts
        model.save_pretrained(path)
        return model

    hf = hf_folder([2, 2, 6, 2], [40, 80, 160, 320], tmp_path / "atto")
    model, report = load(tmp_path / "atto", backend)
    assert "Hugging Face transformers ConvNeXt V2" in report.source and "ConvNextV2ForImageClassification" in \
        report.source
    assert report.ignored == ("classifier", "convnextv2.layernorm") and report.fresh == ("decoder",)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval().encoder(x, torch.ones(2, 2, 3, dtype=torch.bool))
        theirs = hf.convnextv2(x).last_hidden_state
    assert ours.shape == theirs.shape and rel_err(ours, theirs) < 1e-5
    hf_folder([2, 2, 6, 2], [48, 96, 192, 384], tmp_path / "femto")
    with pytest.raises(ConversionError, match="holds convnextv2_femto weights, not convnextv2_atto's"):
        load(tmp_path / "femto")


@pytest.mark.parametrize("in_chans", [1, 4])
def test_rgb_weights_into_a_model_for_other_channels_as_timm_adapts_them(in_chans, tmp_path):
    """model.in_chans=1 (grayscale) or 4: the stem is adapted as timm's pretrained=True, in_chans=N does,
    and the sparse encoder then equals timm's dense model built that way; nothing else may differ."""
    dense, _ = random_dense("resnet18")
    path = _save(tmp_path / "rgb.pth", dense.state_dict())
    model = build_model("resnet18", overrides=[f"model.in_chans={in_chans}"])
    report = init_from_dense(model, path, "resnet18")
    assert f"conv1.weight adapted from 3 to {in_chans} input channels" in report.line()
    ref = timm.create_model("resnet18", in_chans=in_chans, pretrained=True, num_classes=10,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    x = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model.eval().encoder(x, torch.ones(2, 2, 2, dtype=torch.bool)), ref.forward_features(x)) < 1e-4


def test_torchvision_file_without_num_batches_tracked_loads(tmp_path):
    """torchvision's older ImageNet files predate ``num_batches_tracked``: allowed, as torch's strict load does."""
    dense, _ = random_dense("resnet18")
    w = {k: v for k, v in dense.state_dict().items() if not k.endswith("num_batches_tracked")}
    model, report = load(_save(tmp_path / "old.pth", w), name="resnet18")
    got = model.encoder.state_dict()
    assert report.ignored == ("fc",) and all(torch.equal(got[k], v) for k, v in w.items() if not k.startswith("fc."))
    assert int(got["layer1.0.bn1.num_batches_tracked"]) == 0


def _save(path, contents):
    torch.save(contents, path)
    return path


@pytest.fixture(scope="module")
def atto_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "atto.pth"
    torch.save(timm.create_model("convnextv2_atto").state_dict(), path)
    return path


def test_bad_files_are_one_line(atto_file, tmp_path):
    def error(path, name="convnextv2_atto", **kw):
        with pytest.raises((ConversionError, CheckpointError)) as e:
            init_from_dense(build_model(name), path, name, **kw)
        message = str(e.value)
        assert "\n" not in message and str(path) in message
        return message

    with torch.device("meta"):
        tiny = timm.create_model("convnextv2_tiny").state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=torch.float16) for k, v in tiny.items()}, tmp_path / "tiny.pth")
    assert "holds convnextv2_tiny weights, not convnextv2_atto's; set model.name=convnextv2_tiny" in error(
        tmp_path / "tiny.pth")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    assert "holds resnet18 weights, not convnextv2_atto's" in error(tmp_path / "r18.pth")
    assert "holds convnextv2_atto weights, not resnet50's" in error(atto_file, "resnet50")
    # a size no registered model has: the misfits themselves
    w = torch.load(atto_file, weights_only=True)
    del w["stages.0.blocks.0.norm.weight"]
    w["extra.weight"] = torch.zeros(1)
    w["stem.0.weight"] = torch.zeros(40, 3, 2, 2)
    message = error(_save(tmp_path / "odd.pth", w))
    assert ("1 missing (stages.0.blocks.0.norm.weight); 1 unexpected (extra.weight); 1 shape mismatches (file vs "
            "model) (stem_conv.weight (40, 3, 2, 2) vs (40, 3, 4, 4))") in message
    # truncated, not a state dict, missing, a folder without config.json, another file than recorded
    data = atto_file.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated" in error(tmp_path / "cut.pth") or "damaged" in error(tmp_path / "cut.pth")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(100)}, str(tmp_path / "cut.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "cut.safetensors").read_bytes()[:-50])
    assert "truncated or not a safetensors file" in error(tmp_path / "cut.safetensors")
    assert "is not a state dict (it holds a list)" in error(_save(tmp_path / "list.pth", [1, 2]))
    assert "is not a state dict (it holds a dict with keys ['epoch', 'lr'])" in error(
        _save(tmp_path / "meta.pth", {"epoch": 3, "lr": 0.1}))
    assert "does not exist" in error(tmp_path / "nope.pth")
    (tmp_path / "empty_dir").mkdir()
    assert "is a folder without config.json" in error(tmp_path / "empty_dir")
    assert "not the recorded model.init_sha256=" in error(atto_file, sha256="0" * 64)


def test_cli_bad_init_is_one_line(atto_file, tmp_path):
    proc = run_tool("pretrain.py", "--init", str(atto_file), "--output-dir", str(tmp_path / "run"),
                    "model.name=resnet18", "train.max_steps=1", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "holds convnextv2_atto weights, not resnet18's" in proc.stderr
    assert not (tmp_path / "run" / "run.json").exists()  # nothing claimed, nothing trained


def test_run_from_dense_weights_then_resume_without_the_file(photo_dir, tmp_path, capsys):
    """A SparK ResNet run from torchvision weights: the encoder (BatchNorm statistics too) starts as the
    file, the decoder fresh, warm-up as usual; run.json and config.yaml record the file and its SHA-256;
    --resume restores from the run's own checkpoint though the file is gone."""
    import json

    import yaml

    from mimsparse.config import load_config
    from mimsparse.train.checkpoint import file_sha256, load_checkpoint
    from mimsparse.train.build import Pretrainer
    from mimsparse.train.optim import warmup_cosine
    from tests.conftest import tiny_overrides

    dense, _ = random_dense("resnet18")
    w = {k: v for k, v in dense.state_dict().items()}
    init = _save(tmp_path / "resnet18.pth", w)
    sha = file_sha256(init)
    out = tmp_path / "run"

    def cfg(steps):
        return load_config(None, tiny_overrides(out, **{
            "model.name": "resnet18", "model.decoder": "spark", "data.path": str(photo_dir), "model.init": str(init),
            "train.max_steps": steps, "optim.warmup_epochs": 1}))

    run = Pretrainer(cfg(2), "packed", show_progress=False)
    # 20 convs + 20 BatchNorms x (weight, bias, running mean, running var, num_batches_tracked)
    assert "init: 120 resnet18 encoder tensors from" in capsys.readouterr().out
    fresh = Pretrainer(load_config(None, tiny_overrides(tmp_path / "other", **{
        "model.name": "resnet18", "model.decoder": "spark", "data.path": str(photo_dir)})), show_progress=False)
    start = run.model.state_dict()
    assert all(torch.equal(start[f"encoder.{k}"], v) for k, v in w.items() if not k.startswith("fc."))
    assert all(torch.equal(start[k], v) for k, v in fresh.model.state_dict().items() if not k.startswith("encoder."))
    history = run.run()["history"]
    steps = run.steps_per_epoch  # warm-up of one epoch, as without model.init
    assert [r["lr"] for r in history] == pytest.approx([run.lr * warmup_cosine(s, steps, run.total_steps, 0.0)
                                                       for s in range(2)])
    record = json.loads((out / "run.json").read_text())["init"]
    assert record["sha256"] == sha and record["path"] == str(init.resolve())
    config = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert config["init"] == str(init.resolve()) and config["init_sha256"] == sha
    ckpt = out / "checkpoint-0000002.pth"
    assert load_checkpoint(ckpt)["config"]["model"]["init_sha256"] == sha

    init.write_bytes(b"")  # unreadable now: resuming must not need it
    resumed = Pretrainer(cfg(3), "dense", resume="auto", show_progress=False)
    assert f"init: {init} not read: a resumed run has its weights from its checkpoint" in capsys.readouterr().out
    saved = load_checkpoint(ckpt)["model"]
    assert resumed.resumed_from == ckpt
    assert all(torch.equal(v, saved[k]) for k, v in resumed.model.state_dict().items())
    assert [r["step"] for r in resumed.run()["history"]] == [3]
    assert json.loads((out / "run.json").read_text())["init"]["sha256"] == sha
    config = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert config["init_sha256"] == sha and config["init"] == str(init.resolve())


def readme_recipe() -> list[str]:
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Continue pretraining from ImageNet weights on your own images, then finetune\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_recipe_runs_as_printed(photo_dir, tmp_path):
    """The README's commands, run in an empty folder with small sizes appended (64 px crops, 2 steps)."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    from mimsparse.train.checkpoint import file_sha256
    from tests.conftest import ROOT
    from tests.test_finetune import SMOKE, image_folder

    image_folder(tmp_path / "my_labelled", photo_dir)
    (tmp_path / "my_images").symlink_to(photo_dir)
    small = {"pretrain.py": ["--img-size", "64", "--batch-size", "4", "--no-progress", "train.max_steps=2",
                             "data.repeat=2", "model.decoder_dim=64"],
             "finetune.py": SMOKE}
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    outputs = []
    for line in readme_recipe():
        args = shlex.split(line)
        assert args[0] == ".venv/bin/python", line
        args[0] = sys.executable
        tool = args[1].removeprefix("tools/") if args[1].startswith("tools/") else None
        args = [str(ROOT / a) if a.startswith(("tools/", "configs/")) else a for a in args]
        args += small.get(tool, [])
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        outputs.append((tool, proc.stdout))
    pretrain = [out for tool, out in outputs if tool == "pretrain.py"]
    assert "(timm ConvNeXt V2 state dict, .pth file); ignored: head.fc, head.norm; fresh: decoder" in pretrain[0]
    assert "resnet50 encoder tensors" in pretrain[1] and "(timm/torchvision ResNet state dict" in pretrain[1]
    assert any(tool == "finetune.py" and "test top-1" in out for tool, out in outputs)
    for run, weights in (("atto_mine", "convnextv2_atto.pth"), ("r50_mine", "resnet50.pth")):
        record = json.loads((tmp_path / "runs" / run / "run.json").read_text())["init"]
        assert record["sha256"] == file_sha256(tmp_path / weights)
