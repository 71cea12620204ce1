"""Finetuning (mimsparse/finetune.py, tools/finetune.py): weights from a pretraining checkpoint, a timm
state dict or random init; stratified label subsets; layer-wise lr decay; top-1; reproducibility; bad input."""
import json
import math
import re
import runpy

import pytest
import timm
import torch
from PIL import Image

from mimsparse.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mimsparse.evaluate.loaders import stratified_subset, top1_correct
from mimsparse.cli import run_cli
from mimsparse.convert.export import load_weights_file
from mimsparse.convert import convert_checkpoint
from mimsparse.evaluate.finetune import create_optimizer, create_scheduler
from mimsparse.evaluate.finetune_engine import evaluate
from mimsparse.evaluate.initial_weights import build_model
from tests.conftest import ROOT, run_tool, tiny_overrides

# a couple of optimizer steps on lfw-subset's 25x25 faces resized to 32x32
SMOKE = ["--img-size", "32", "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress"]


def pretrained_checkpoints(tmp_path_factory, photo_dir) -> dict:
    """A 1-step tools/pretrain.py checkpoint of convnextv2_atto and its conversion to a 1000-class timm
    state dict. Kept under the session's base temp folder, so the probe tests reuse the same files."""
    folder = tmp_path_factory.getbasetemp() / "pretrained-atto"
    ckpt, dense = folder / "checkpoint-0000001.pth", folder / "dense-1000.pth"
    if not dense.is_file():
        run_tool("pretrain.py", "--data", str(photo_dir), "--no-progress",
                 *tiny_overrides(folder, **{"train.max_steps": 1}))
        sd, _, _ = convert_checkpoint(load_checkpoint(ckpt), num_classes=1000)  # as tools/convert_to_dense.py
        save_checkpoint(sd, dense)
    return {"ckpt": ckpt, "dense": dense}


def image_folder(root, photo_dir):
    """root/{train,test}/{a,b}/*.png: 3 + 1 crops of each of 6 photos, photos 0-2 are class a, 3-5 class b."""
    photos = sorted(photo_dir.glob("*.png"))
    for k, path in enumerate(photos):
        with Image.open(path) as img:
            for j, box in enumerate([(0, 0, 48, 48), (48, 0, 96, 48), (0, 48, 48, 96), (48, 48, 96, 96)]):
                split = "test" if j == 3 else "train"
                folder = root / split / ("a" if k < 3 else "b")
                folder.mkdir(parents=True, exist_ok=True)
                img.crop(box).save(folder / f"{path.stem}-{j}.png")
    return root


@pytest.fixture
def pretrained(tmp_path_factory, photo_dir):
    return pretrained_checkpoints(tmp_path_factory, photo_dir)


def tool_main(name):
    return runpy.run_path(str(ROOT / "tools" / f"{name}.py"))["main"]


def read_results(out):
    results = json.loads((out / "results.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return results, log


def strict_load(path, name, num_classes):
    model = timm.create_model(name, num_classes=num_classes)
    model.load_state_dict(load_weights_file(path)[0], strict=True)
    return model


# ---- end to end -------------------------------------------------------------------------------------
def test_tool_from_pretraining_checkpoint(pretrained, tmp_path):
    out = tmp_path / "ft"
    proc = run_tool("finetune.py", "--ckpt", str(pretrained["ckpt"]), "--data", "lfw-subset", "--label-fraction", "0.2",
                    "--eval-limit", "20", "--output-dir", str(out), *SMOKE)
    assert "converted to timm convnextv2_atto" in proc.stdout and "test top-1" in proc.stdout
    results, log = read_results(out)
    assert results["model"] == "convnextv2_atto" and results["num_classes"] == 2 and results["steps"] == 2
    assert results["data"] == {"name": "lfw-subset", "train_images": 30, "train_images_total": 150, "test_images": 20,
                               "evaluated_on": "test"}
    assert 0.0 <= results["best_top1"] <= 1.0 and 0.0 <= results["final_top1"] <= 1.0
    assert len(log) == len(results["history"]) == 1 and log[0]["test_total"] == 20
    assert log[0]["test_top1"] == log[0]["test_correct"] / 20
    assert results["args"]["label_fraction"] == 0.2 and results["wall_time_s"] > 0
    strict_load(out / "best.safetensors", "convnextv2_atto", 2)


def test_tool_from_converted_state_dict_on_image_folder(pretrained, tmp_path, photo_dir):
    data, out = image_folder(tmp_path / "data", photo_dir), tmp_path / "ft"
    proc = run_tool("finetune.py", "--ckpt", str(pretrained["dense"]), "--model", "convnextv2_atto",
                    "--data", str(data), "--output-dir", str(out), *SMOKE)
    assert "replaced the state dict's 1000-class classifier by a fresh 2-class one" in proc.stdout
    results, _ = read_results(out)
    assert results["data"]["train_images"] == 18 and results["data"]["test_images"] == 6
    assert results["data"]["evaluated_on"] == "test"
    assert 0.0 <= results["final_top1"] <= 1.0
    # the encoder started from the state dict: two AdamW steps move a weight by at most ~2 x lr (1e-3 x 8/256)
    tuned = strict_load(out / "best.safetensors", "convnextv2_atto", 2).state_dict()
    dense = torch.load(pretrained["dense"], weights_only=True)
    assert (tuned["stem.0.weight"] - dense["stem.0.weight"]).abs().max() < 1e-3


def test_random_init_is_reproducible_with_mixup(tmp_path):
    """Equal seeds give equal runs (label subset, head init, order, augmentation, drop path, mixup/cutmix
    draws); the tool runs in-process here, the same main() as from the command line."""
    main = tool_main("finetune")

    def run(seed, out):
        assert main(["--ckpt", "random", "--model", "convnextv2_atto", "--data", "lfw-subset", "--seed", str(seed),
                     "--label-fraction", "0.5", "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.2",
                     "--eval-limit", "10", "--output-dir", str(out), *SMOKE, "--max-steps", "3"]) == 0
        results, log = read_results(out)
        assert results["weights"] == ["weights: random init (baseline)"] and results["steps"] == 3
        return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in log], strict_load(out / "best.safetensors",
                                                                                              "convnextv2_atto", 2)

    log_a, model_a = run(0, tmp_path / "a")
    log_b, model_b = run(0, tmp_path / "b")
    log_c, _ = run(1, tmp_path / "c")
    assert log_a == log_b
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert log_a[0]["train_loss"] != log_c[0]["train_loss"]


# ---- pieces -----------------------------------------------------------------------------------------
def test_top1_matches_a_hand_count():
    class Table(torch.nn.Module):
        """Logits looked up by the sample id stored in pixel [0, 0, 0]."""

        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits[x[:, 0, 0, 0].long()]

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.1, 0.2, 0.3], [5.0, 0.0, 0.0],
                           [0.0, 0.0, 1.0], [1.0, 2.0, 0.0], [0.0, 1.0, 0.5]])
    labels = torch.tensor([0, 1, 0, 1, 2, 1, 2])
    # arg-max per row: 0 1 2 0 2 1 1 -> rows 0, 1, 4 and 5 are right: 4 of 7
    assert top1_correct(logits, labels) == 4
    images = torch.zeros(7, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(7.0)
    loader = [(images[:4], labels[:4], 0), (images[4:], labels[4:], 1)]
    result = evaluate(Table(logits), loader, "cpu")
    assert result["correct"] == 4 and result["total"] == 7 and result["top1"] == pytest.approx(4 / 7)
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def _step_run(model, lr=1.0):
    """What train_one_epoch uses of a run: plain SGD (lr 1: a step moves the weights by minus the gradient)."""
    from types import SimpleNamespace

    return SimpleNamespace(train_model=model, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                           scheduler=SimpleNamespace(step_update=lambda step: None), device=torch.device("cpu"),
                           mixup=None, criterion=torch.nn.CrossEntropyLoss(),
                           scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None)


def test_accumulated_micro_batches_make_the_step_of_their_whole_batch_and_clipping_bounds_it():
    """4 micro-batches of 2 with --accum-iter 2 = 2 SGD steps, each on the mean loss of its 4 images
    (checked against autograd on the concatenated batch); --clip-grad c makes each step's norm <= c."""
    from mimsparse.evaluate.finetune_engine import StepOptions, train_one_epoch

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
    loader = [(images[i:i + 2], labels[i:i + 2], 0) for i in range(0, 8, 2)]
    start = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    reference = [p.detach().clone() for p in start.parameters()]
    for k in range(2):  # by hand: one step per 4 images
        params = [p.requires_grad_() for p in reference]
        loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(
            images[4 * k:4 * k + 4].flatten(1), params[0], params[1]), labels[4 * k:4 * k + 4])
        grads = torch.autograd.grad(loss, params)
        reference = [(p - gr).detach() for p, gr in zip(params, grads)]

    import copy

    model = copy.deepcopy(start)
    stats = train_one_epoch(_step_run(model), loader, 0, StepOptions(accum=2), show_progress=False)
    assert stats["step"] == 2 and stats["batches_done"] == 4 and stats["images"] == 8
    for ours, theirs in zip(model.parameters(), reference):
        assert torch.allclose(ours, theirs, atol=1e-6)

    clipped = copy.deepcopy(start)
    train_one_epoch(_step_run(clipped), loader[:2], 0, StepOptions(accum=2, clip_grad=1e-3), show_progress=False)
    moved = torch.cat([(a - b).flatten() for a, b in zip(clipped.parameters(), start.parameters())]).norm()
    assert 0.999e-3 < moved <= 1.0001e-3  # the unclipped step's norm is far larger: it was clipped to 1e-3


def test_the_weight_average_follows_every_step_by_its_decay():
    """--model-ema: after each optimizer step ema = d * ema + (1 - d) * weights (by hand, d = 0.5)."""
    import copy

    from timm.utils import ModelEmaV3

    from mimsparse.evaluate.finetune_engine import StepOptions, train_one_epoch

    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(2, 3, 2, 2, generator=g), torch.randint(0, 3, (2,), generator=g), 0) for _ in range(3)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    run = _step_run(model, lr=0.5)
    run.ema = ModelEmaV3(model, decay=0.5)
    expected = [p.detach().clone() for p in model.parameters()]
    plain = copy.deepcopy(model)
    plain_run = _step_run(plain, lr=0.5)
    for batch in loader:  # the same SGD steps one at a time, averaged by hand
        train_one_epoch(plain_run, [batch], 0, StepOptions(), show_progress=False)
        expected = [0.5 * e + 0.5 * p.detach() for e, p in zip(expected, plain.parameters())]
    train_one_epoch(run, loader, 0, StepOptions(), show_progress=False)
    for ours, theirs in zip(run.ema.module.parameters(), expected):
        assert torch.allclose(ours, theirs, atol=1e-7)


def test_label_fraction_subset_is_stratified_and_seeded():
    shuffle = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[shuffle]
    idx = stratified_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 2]
    assert idx.tolist() == sorted(set(idx.tolist()))  # sorted, no repeats
    assert torch.equal(idx, stratified_subset(labels, 0.1, seed=0))
    assert not torch.equal(idx, stratified_subset(labels, 0.1, seed=1))
    assert torch.bincount(labels[stratified_subset(labels, 0.01, seed=0)]).tolist() == [1, 1, 1]  # >= 1 per class
    assert torch.equal(stratified_subset(labels, 1.0, seed=3), torch.arange(100))
    # the same seed keeps the same images of a class whatever the other classes hold
    fewer = labels.clone()
    fewer[fewer == 2] = 1
    other = stratified_subset(fewer, 0.1, seed=0)
    assert torch.equal(idx[labels[idx] == 0], other[fewer[other] == 0])


def test_layer_decay_scales_the_scheduled_lr():
    """timm groups convnextv2_atto into 14 depths: stem 0 ... head 13 (downsample k joins block 0 of
    stage k). The lr a group gets after a scheduler step is the schedule value x 0.9^(13 - depth)."""
    model = timm.create_model("convnextv2_atto", num_classes=3)
    lr, min_lr = 1e-3, 1e-6
    optimizer = create_optimizer(model, lr, weight_decay=0.05, layer_decay=0.9)
    scheduler = create_scheduler(optimizer, total_steps=10, warmup_steps=4, min_lr=min_lr)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())

    def group_lr(name):
        return group_of[id(params[name])]["lr"]

    for step, value in ((2, lr * 2 / 4), (7, min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * 3 / 6)))):
        scheduler.step_update(step)
        assert group_lr("head.fc.weight") == pytest.approx(value, rel=1e-12)
        assert group_lr("stem.0.weight") == pytest.approx(value * 0.9 ** 13, rel=1e-12)
        assert group_lr("stages.2.blocks.3.mlp.fc1.weight") == pytest.approx(value * 0.9 ** 5, rel=1e-12)
    # no weight decay on norms, biases and GRN; decay on conv / linear weights
    assert group_of[id(params["stem.0.weight"])]["weight_decay"] == 0.05
    for name in ("stem.0.bias", "stem.1.weight", "stages.0.blocks.0.mlp.grn.weight", "head.norm.weight",
                 "head.fc.bias"):
        assert group_of[id(params[name])]["weight_decay"] == 0.0, name

    # and the update uses it: AdamW's first step moves each element by lr x |g| / (|g| + eps) ~ lr
    before = {k: params[k].detach().clone() for k in ("stem.0.bias", "head.fc.bias")}
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    optimizer.step()
    moved = {k: (params[k].detach() - before[k]).abs().max().item() for k in before}
    value = group_lr("head.fc.weight")
    assert moved["head.fc.bias"] == pytest.approx(value, rel=1e-3)
    assert moved["stem.0.bias"] == pytest.approx(value * 0.9 ** 13, rel=1e-3)


def test_build_model_heads(pretrained, tmp_path):
    dense = torch.load(pretrained["dense"], weights_only=True)
    model, name, notes = build_model(str(pretrained["dense"]), "convnextv2_atto", 5, seed=0, head_init_scale=0.001)
    assert name == "convnextv2_atto" and "replaced the state dict's 1000-class classifier" in notes[-1]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in dense.items() if not k.startswith("head.fc."))
    assert sd["head.fc.weight"].shape == (5, 320) and 0 < sd["head.fc.weight"].abs().max() < 0.001 * 2 * 0.02 * 5
    # the same seed draws the same fresh head; a head of the right size is kept as it is
    again, _, _ = build_model(str(pretrained["dense"]), "convnextv2_atto", 5, seed=0, head_init_scale=0.001)
    assert torch.equal(again.state_dict()["head.fc.weight"], sd["head.fc.weight"])
    trained = {**dense, "head.fc.weight": dense["head.fc.weight"] + 0.01}  # a head that was trained
    save_checkpoint(trained, tmp_path / "trained.pth")
    kept, _, notes = build_model(str(tmp_path / "trained.pth"), "convnextv2_atto", 1000, seed=0, head_init_scale=0.001)
    assert torch.equal(kept.state_dict()["head.fc.weight"], trained["head.fc.weight"]) and len(notes) == 1
    # the untrained head a conversion drew is re-drawn and scaled exactly as the pretraining-checkpoint route does
    redrawn, _, notes = build_model(str(pretrained["dense"]), "convnextv2_atto", 1000, seed=0, head_init_scale=0.001)
    routed, _, _ = build_model(str(pretrained["ckpt"]), None, 1000, seed=0, head_init_scale=0.001)
    assert "never trained" in notes[-1]
    assert all(torch.equal(a, b) for a, b in zip(redrawn.state_dict().values(), routed.state_dict().values()))
    assert redrawn.state_dict()["head.fc.weight"].abs().max() < 0.001 * 2 * 0.02 * 5
    # a pretraining checkpoint names its model and gets a fresh head drawn from the seed
    from_ckpt, name, notes = build_model(str(pretrained["ckpt"]), None, 5, seed=0, head_init_scale=0.001)
    assert name == "convnextv2_atto" and "converted" in notes[0]
    assert torch.equal(from_ckpt.state_dict()["head.fc.weight"], sd["head.fc.weight"])
    assert torch.equal(from_ckpt.state_dict()["stem.0.weight"], dense["stem.0.weight"])


def test_finetune_starts_from_a_hugging_face_or_timm_model_folder(tmp_path):
    """A transformers ConvNeXt V2 folder (facebook/convnextv2-* layout): the timm model built from it
    gives transformers' own logits when the class counts agree (its trained classifier kept), and gets a
    fresh head otherwise; a timm folder names its model in config.json, so --model is not needed."""
    transformers = pytest.importorskip("transformers")
    from mimsparse.convert.export import save_timm_folder
    from tests.helpers import randomize_

    config = transformers.ConvNextV2Config(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=2)
    hf = transformers.ConvNextV2ForImageClassification(config).eval()
    randomize_(hf, 0, std=0.05)
    hf.save_pretrained(tmp_path / "hf")
    model, name, notes = build_model(str(tmp_path / "hf"), None, 2)
    assert name == "convnextv2_atto" and notes == [f"weights: Hugging Face transformers ConvNeXt V2 {tmp_path / 'hf'} "
                                                   f"as timm convnextv2_atto"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), hf(x).logits, atol=1e-5)
    assert "replaced the state dict's 2-class classifier by a fresh 3-class one" in build_model(
        str(tmp_path / "hf"), None, 3)[2]
    with pytest.raises(CheckpointError, match="holds a transformers ConvNeXt V2 of convnextv2_atto, not "
                                              "convnextv2_femto"):
        build_model(str(tmp_path / "hf"), "convnextv2_femto", 2)
    odd = transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_labels=2))
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(CheckpointError, match="whose widths and depths match no convnextv2_\\* size of timm"):
        build_model(str(tmp_path / "odd"), None, 2)
    save_timm_folder(model.state_dict(), tmp_path / "timm", "convnextv2_atto", 2)
    again, name, _ = build_model(str(tmp_path / "timm"), None, 2)
    assert name == "convnextv2_atto" and all(torch.equal(v, model.state_dict()[k])
                                             for k, v in again.state_dict().items())
    assert tool_main("finetune")(["--checkpoint", str(tmp_path / "hf"), "--data", "lfw-subset",
                                  "--output-dir", str(tmp_path / "ft"), *SMOKE]) == 0


# ---- bad input --------------------------------------------------------------------------------------
def test_bad_input_gives_one_error_line(pretrained, tmp_path, capsys):
    main = tool_main("finetune")
    neither = tmp_path / "neither.pth"
    torch.save({"epoch": 3, "weights": [1, 2]}, neither)
    base = ["--data", "lfw-subset", "--output-dir", str(tmp_path / "out"), *SMOKE]
    cases = [
        (["--ckpt", "random", "--model", "convnextv2_atto", "--img-size", "48"], r"--img-size 48 is not a positive "
         r"multiple of 32.*--img-size 64"),
        (["--ckpt", "random", "--model", "convnextv2_atto", "--label-fraction", "0"], r"--label-fraction 0 must be in "
         r"\(0, 1\]"),
        (["--ckpt", "random", "--model", "convnextv2_atto", "--label-fraction", "1.5"],
         r"--label-fraction 1.5 must be"),
        (["--ckpt", str(neither), "--model", "convnextv2_atto"], r"neither a mimsparse pretraining checkpoint .* nor a "
         r"timm state dict .*\['epoch', 'weights'\]"),
        (["--ckpt", "random"], r"--checkpoint random needs --model"),
        (["--ckpt", str(pretrained["ckpt"]), "--model", "convnextv2_femto"], r"pretrained as 'convnextv2_atto' but "
         r"--model asks for 'convnextv2_femto'"),
        (["--ckpt", str(pretrained["dense"]), "--model", "convnextv2_femto"], r"does not fit timm convnextv2_femto"),
        (["--ckpt", "random", "--model", "no_such_net"], r"timm cannot create 'no_such_net'"),
        (["--ckpt", str(tmp_path / "missing.pth"), "--model", "convnextv2_atto"], r"does not exist"),
        (["--ckpt", "random", "--model", "convnextv2_atto", "--amp", "fp16", "--device", "cpu"],
         r"--amp fp16 is for CUDA .* use --amp bf16 or --amp none"),
        (["--ckpt", "random", "--model", "convnextv2_atto", "--accum-iter", "0"], r"--accum-iter must be at least 1"),
        (["--ckpt", "random", "--model", "convnextv2_atto", "--accum-iter", "20"], r"fewer than one batch \(8 x 20 "
         r"accumulated\)"),
    ]
    for args, expected in cases:
        assert run_cli(lambda: main([*base, *args])) == 2, args
        err = capsys.readouterr().err
        assert re.match(r"error: .*" + expected, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "best.safetensors").exists()
