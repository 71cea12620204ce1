"""One command-line convention across the tools (mimsparse/cli_args.py): --img-size, --batch-size,
--output-dir and the checkpoint (first argument or --checkpoint) everywhere, the old spellings still
parsing to the same values while hidden from --help."""
import argparse
import runpy

import pytest

from mimsparse.cli_args import resolve_checkpoint
from tests.conftest import ROOT


class Parsed(Exception):
    def __init__(self, parser, namespace):
        self.parser, self.namespace = parser, namespace


def parse(tool: str, argv: list[str], monkeypatch) -> dict:
    """The namespace tools/<tool>.py's main() gets from ``argv`` (stopped right after parsing), with the
    two checkpoint forms merged as the tools merge them."""
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        raise Parsed(self, original(self, args, namespace)[0])  # the first parser to parse is the tool's

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    main = runpy.run_path(str(ROOT / "tools" / f"{tool}.py"))["main"]
    with pytest.raises(Parsed) as e:
        main(argv)
    ns = e.value.namespace
    if hasattr(ns, "_checkpoint_many"):
        resolve_checkpoint(e.value.parser, ns)
    return vars(ns)


CASES = [  # tool, new spelling, old spelling
    ("finetune", ["--checkpoint", "a.pth", "--data", "d", "--img-size", "64"],
     ["--ckpt", "a.pth", "--data", "d", "--img", "64"]),
    ("finetune", ["a.pth", "--data", "d"], ["--ckpt", "a.pth", "--data", "d"]),
    ("linear_probe", ["--checkpoint", "random", "--data", "d", "--batch-size", "16"],
     ["--ckpt", "random", "--data", "d", "--batch", "16"]),
    ("feature_collapse", ["a.pth", "--checkpoint", "b.pth", "--img-size", "96"],
     ["a.pth", "--ckpt", "b.pth", "--img", "96"]),
    ("visualize", ["--checkpoint", "c.pth", "--image", "x.png", "--img-size", "192x320"],
     ["c.pth", "--image", "x.png", "--img", "192x320"]),
    ("show_masks", ["--img-size", "96x128"], ["--img", "96x128"]),
    ("convert_to_dense", ["--checkpoint", "c.pth", "-o", "x.safetensors"], ["c.pth", "--output", "x.safetensors"]),
    ("benchmark", ["--batch-size", "2", "--img-size", "64x96", "--output-dir", "o"],
     ["--batch", "2", "--img", "64x96", "--out-dir", "o"]),
    ("pretrain", ["--data", "d", "--img-size", "64x96", "--batch-size", "2", "--output-dir", "o", "train.epochs=1"],
     ["--data-path", "d", "--img", "64x96", "--batch", "2", "--out-dir", "o", "train.epochs=1"]),
    ("benchmark_data", ["--batch-size", "2", "--img-size", "64", "--output-dir", "o"],
     ["--batch", "2", "--img", "64", "--out-dir", "o"]),
]


@pytest.mark.parametrize("tool,new,old", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_old_and_new_spellings_parse_alike(tool, new, old, monkeypatch):
    a, b = parse(tool, new, monkeypatch), parse(tool, old, monkeypatch)
    assert a == b
    for key, flag in (("img_size", "--img-size"), ("batch_size", "--batch-size"), ("output_dir", "--output-dir")):
        if flag in new:
            assert a[key] == type(a[key])(new[new.index(flag) + 1])


def test_checkpoint_forms(monkeypatch):
    assert parse("feature_collapse", ["a.pth", "--checkpoint", "b.pth"], monkeypatch)["checkpoint"] == ["a.pth", "b.pth"]
    with pytest.raises(SystemExit):
        parse("convert_to_dense", [], monkeypatch)  # no checkpoint at all
    with pytest.raises(SystemExit):
        parse("convert_to_dense", ["a.pth", "--checkpoint", "b.pth"], monkeypatch)  # two different ones


@pytest.mark.parametrize("tool", ["finetune", "linear_probe", "feature_collapse", "visualize", "show_masks",
                                  "convert_to_dense", "benchmark", "predict", "pretrain", "benchmark_data"])
def test_help_shows_the_new_names_only(tool, capsys):
    main = runpy.run_path(str(ROOT / "tools" / f"{tool}.py"))["main"]
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for old in ("--ckpt ", "--img ", "--batch ", "--out-dir", "--data-path"):
        assert old not in text.replace("--ckpt still", ""), (tool, old)
    if tool not in ("show_masks", "convert_to_dense"):
        assert "--img-size" in text or "--batch-size" in text


@pytest.mark.parametrize("argv", [["--img-size", "64x96", "--batch-size", "3", "--data-path", "d", "--output-dir", "o"],
                                  ["--img", "64x96", "--batch", "3", "--data", "d", "--out-dir", "o"]])
def test_pretrain_options_set_the_config(argv, monkeypatch):
    """Both spellings reach the run's config: data.img_size HxW (non-square crops), train.batch_size,
    data.path, train.output_dir."""
    import mimsparse.train.build

    def capture(cfg, *args, **kwargs):
        raise Parsed(None, cfg)

    monkeypatch.setattr(mimsparse.train.build, "build_run", capture)
    main = runpy.run_path(str(ROOT / "tools" / "pretrain.py"))["main"]
    with pytest.raises(Parsed) as e:
        main([*argv, "--device", "cpu"])
    cfg = e.value.namespace
    assert cfg.data.size_hw == (64, 96) and cfg.train.batch_size == 3
    assert cfg.data.path == "d" and cfg.train.output_dir == "o"
