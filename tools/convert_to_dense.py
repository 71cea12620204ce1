#!/usr/bin/env python
"""Sparse pretraining checkpoint -> dense weights (strict-loadable, fresh classifier head).

ConvNeXt V2 encoders become timm ``convnextv2_*`` state dicts; ResNet encoders (``resnet18/34/50/101``)
become one state dict that torchvision's ``resnet*`` and timm's ``resnet*`` both load (same keys).

  tools/convert_to_dense.py runs/pretrain/checkpoint-0000100.pth [-o dense.safetensors] [--num-classes N]
  tools/convert_to_dense.py CKPT -o atto.pth                  # a bare torch state dict (.pth suffix or --format pth)
  tools/convert_to_dense.py CKPT --format timm -o atto-timm/  # config.json + model.safetensors for timm
  tools/convert_to_dense.py CKPT --format transformers -o atto-hf/   # for transformers' ConvNextV2ForImageClassification
  tools/convert_to_dense.py CKPT --num-classes 0              # encoder only (timm's num_classes=0)

safetensors files carry model name, num_classes, source checkpoint and the measured conversion error
in their header; every output is written atomically with mode 0644 (minus the umask). The tool prints
the exact line that loads what it wrote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_output(checkpoint: str, fmt: str) -> Path:
    stem = Path(checkpoint).stem + "-timm"
    if fmt == "transformers":
        return Path(checkpoint).with_name(Path(checkpoint).stem + "-transformers")
    return Path(checkpoint).with_name(stem if fmt == "timm" else f"{stem}.{fmt}")


def main(argv=None) -> int:
    from mimsparse.cli_args import add_checkpoint, resolve_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint(p, "checkpoint written by tools/pretrain.py")
    p.add_argument("-o", "--output", default=None,
                   help="output file or folder (default: <checkpoint>-timm.safetensors, .pth or folder)")
    p.add_argument("--format", default=None, choices=["safetensors", "pth", "timm", "transformers"],
                   help="safetensors (default), pth (bare torch state dict), timm (folder: config.json + "
                   "model.safetensors) or transformers (ConvNeXt V2: a folder for Hugging Face transformers' "
                   "ConvNextV2ForImageClassification.from_pretrained); default: from the -o suffix, else safetensors")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="classifier size of the fresh head; 0 = encoder only (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative error allowed by the self-check")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the dense model with the sparse encoder")
    args = p.parse_args(argv)
    checkpoint = resolve_checkpoint(p, args)
    if args.num_classes < 0:
        p.error(f"--num-classes must be >= 0 (0 = encoder only), got {args.num_classes}")

    import mimsparse
    from mimsparse.convert import convert_checkpoint
    from mimsparse.convert.export import SUFFIXES, export_format, load_lines, save_timm_folder, save_weights
    from mimsparse.config import config_from_dict
    from mimsparse.train.resume import recorded_config
    from mimsparse.models.registry import family_of
    from mimsparse.train.checkpoint import load_checkpoint

    fmt = args.format or ("timm" if args.output and args.output.endswith("/") else None)
    suffix = Path(args.output).suffix if args.output else ""
    if fmt is None and suffix and suffix not in SUFFIXES:  # no suffix at all: safetensors, as documented
        p.error(f"-o {args.output}: the suffix {suffix!r} names no format this tool writes; use .safetensors, "
                f".pth (.pt, .bin), a folder ending in / (timm folder), or --format")
    fmt = fmt or export_format(args.output or "x.safetensors")
    out = Path(args.output) if args.output else default_output(checkpoint, fmt)
    ckpt = load_checkpoint(checkpoint)
    sd, name, error = convert_checkpoint(ckpt, args.num_classes, verify=not args.no_verify, tolerance=args.tolerance)
    metadata = {"model_name": name, "num_classes": args.num_classes, "source_checkpoint": str(checkpoint),
                "source_step": (ckpt.get("run") or {}).get("step"), "conversion_error": error,
                "head": "fresh (drawn from seed 0 at conversion)" if args.num_classes else "none (encoder only)",
                "libraries": list(family_of(name).libraries), "mimsparse_version": mimsparse.__version__}
    if fmt == "transformers":
        from mimsparse.convert.hf_transformers import save_transformers_folder

        cfg = config_from_dict(recorded_config(ckpt, checkpoint))
        save_transformers_folder(sd, out, name, args.num_classes, max(cfg.data.size_hw), metadata)
        kind = "ConvNextV2ForImageClassification" if args.num_classes else "ConvNextV2Model"
        lines = [f"transformers.{kind}.from_pretrained('{out}')"]
        what = "transformers folder (config.json + model.safetensors)"
    elif fmt == "timm":
        cfg = config_from_dict(recorded_config(ckpt, checkpoint))  # the size it was pretrained at
        save_timm_folder(sd, out, name, args.num_classes, metadata,
                         input_size=(cfg.model.in_chans, *cfg.data.size_hw))
        lines, what = load_lines(name, args.num_classes, out, folder=True), "timm folder (config.json + model.safetensors)"
    else:
        save_weights(sd, out, metadata, fmt)
        lines = load_lines(name, args.num_classes, out, tuple(reversed(family_of(name).libraries)))
        what = "safetensors (metadata in its header)" if fmt == "safetensors" else "bare torch state dict"
    check = f"max relative error vs sparse encoder at mask ratio 0: {error:.2e}" if error is not None else "not verified"
    libraries = "transformers" if fmt == "transformers" else "/".join(reversed(family_of(name).libraries))
    head = f"num_classes={args.num_classes}" if args.num_classes else "encoder only, num_classes=0"
    print(f"wrote {out}: {libraries} {name} ({head}), {what}; {check}")
    for i, line in enumerate(lines):
        print(f"{'load with' if i == 0 else '       or'}: {line}")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
