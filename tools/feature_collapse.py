#!/usr/bin/env python
"""ConvNeXt V2 feature-collapse analysis: per block, the average pairwise cosine distance between
feature channels, (1/C^2) sum_ij (1 - cos(X_i, X_j)) / 2, averaged over images (paper, Sec. 3.2).

  tools/feature_collapse.py runs/fcmae_atto/checkpoint-0000100.pth [--images DIR] [-o collapse.png] [--csv collapse.csv]
  tools/feature_collapse.py dense.pth --model convnextv2_atto        # a plain timm state dict
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by tools/pretrain.py, or a timm state dict (with --model)")
    p.add_argument("--model", default=None, help="timm model name, required for a plain timm state dict")
    p.add_argument("--images", default=None, help="folder of images (default: the bundled scikit-image photos)")
    p.add_argument("--img-size", type=int, default=224, help="resize shorter side + centre crop (default 224)")
    p.add_argument("--exclude-self", action="store_true",
                   help="average over the C(C-1) pairs i != j instead of the paper's C^2 pairs")
    p.add_argument("-o", "--output", default=None, help="PNG plot (default: <checkpoint>-collapse.png)")
    p.add_argument("--csv", default=None, help="CSV table (default: <checkpoint>-collapse.csv)")
    args = p.parse_args(argv)

    import torch

    from mimsparse.checkpoint import load_checkpoint
    from mimsparse.collapse import feature_collapse, image_paths, load_images, load_timm_model, plot, write_csv

    torch.set_grad_enabled(False)
    stem = Path(args.checkpoint).with_suffix("")
    png = Path(args.output) if args.output else stem.with_name(stem.name + "-collapse.png")
    csv_path = Path(args.csv) if args.csv else stem.with_name(stem.name + "-collapse.csv")

    model, name = load_timm_model(load_checkpoint(args.checkpoint), args.model)
    paths = image_paths(args.images)
    images = load_images(paths, args.img_size)
    rows = feature_collapse(model, images, exclude_self=args.exclude_self)
    write_csv(rows, csv_path)
    plot(rows, png, title=f"{name}: feature collapse ({len(paths)} images)")
    for r in rows:
        print(f"layer {r['layer']:3d}  stage {r['stage']}  block {r['block']:2d}  C={r['channels']:4d}  {r['distance']:.4f}")
    print(f"wrote {csv_path} and {png} ({len(rows)} blocks, {len(paths)} images)")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
