#!/usr/bin/env python
"""Sparse pretraining checkpoint -> dense state dict (strict-loadable, fresh classifier head).

ConvNeXt V2 encoders become timm ``convnextv2_*`` state dicts; ResNet encoders (``resnet18/34/50/101``)
become one state dict that torchvision's ``resnet*`` and timm's ``resnet*`` both load (same keys).

  tools/convert_to_dense.py runs/pretrain/checkpoint-0000100.pth [-o dense.pth] [--num-classes N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by tools/pretrain.py")
    p.add_argument("-o", "--output", default=None, help="output file (default: <checkpoint>-timm.pth)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size of the fresh head")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative error allowed by the self-check")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the dense model with the sparse encoder")
    args = p.parse_args(argv)

    from mimsparse.train.checkpoint import load_checkpoint, save_checkpoint
    from mimsparse.convert import convert_checkpoint
    from mimsparse.models.registry import family_of, load_lines

    ckpt = load_checkpoint(args.checkpoint)
    sd, name, error = convert_checkpoint(ckpt, args.num_classes, verify=not args.no_verify, tolerance=args.tolerance)
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix("").with_name(
        Path(args.checkpoint).stem + "-timm.pth")
    save_checkpoint(sd, out)
    check = f"max relative error vs sparse encoder at mask ratio 0: {error:.2e}" if error is not None else "not verified"
    libraries = "/".join(reversed(family_of(name).libraries))
    print(f"wrote {out}: {libraries} {name} (num_classes={args.num_classes}); {check}")
    for i, line in enumerate(load_lines(name, args.num_classes, str(out))):  # a bare state dict (no 'model' key)
        print(f"{'load with' if i == 0 else '       or'}: {line}")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
