#!/usr/bin/env python
"""ConvNeXt V2 feature-collapse analysis: per block, the average pairwise cosine distance between
feature channels, (1/C^2) sum_ij (1 - cos(X_i, X_j)) / 2, averaged over images (paper, Sec. 3.2).
Several checkpoints give one curve each in the same plot (e.g. pretrained with and without GRN).

  tools/feature_collapse.py runs/fcmae_atto/checkpoint-0000100.pth [--images DIR] [-o collapse.png] [--csv collapse.csv]
  tools/feature_collapse.py grn.pth nogrn.pth --label GRN --label "no GRN" --where mlp \\
      --images fashion-mnist --num-images 200 --img-size 96 -o collapse.png
  tools/feature_collapse.py dense.pth --model convnextv2_atto        # a plain timm state dict
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from mimsparse.cli_args import add_checkpoint, add_img_size, resolve_checkpoint

    add_checkpoint(p, "checkpoint(s) written by tools/pretrain.py, or timm state dicts (.safetensors or .pth, "
                   "with --model)", many=True)
    p.add_argument("--label", action="append", default=None,
                   help="curve name, once per checkpoint in the same order (default: file names)")
    p.add_argument("--model", default=None, help="timm model name, required for a plain timm state dict")
    p.add_argument("--images", default=None, help="folder of images, or a built-in dataset name (its test "
                   "split, e.g. fashion-mnist); default: the bundled scikit-image photos")
    p.add_argument("--num-images", type=int, default=0, help="use the first N images (default: all)")
    add_img_size(p, 224, "resize shorter side + centre crop (default 224)", type=int)
    p.add_argument("--where", default="block", choices=["block", "mlp", "grn"],
                   help="block output (default), the MLP expansion activation before GRN (mlp, paper Fig. 3) "
                   "or after it (grn)")
    p.add_argument("--exclude-self", action="store_true",
                   help="average over the C(C-1) pairs i != j instead of the paper's C^2 pairs")
    p.add_argument("-o", "--output", default=None, help="PNG plot (default: <first checkpoint>-collapse.png)")
    p.add_argument("--csv", default=None, help="CSV table (default: <first checkpoint>-collapse.csv)")
    args = p.parse_args(argv)
    args.checkpoints = resolve_checkpoint(p, args)
    if args.label is not None and len(args.label) != len(args.checkpoints):
        p.error(f"{len(args.label)} --label for {len(args.checkpoints)} checkpoints; give one per checkpoint or none")
    labels = args.label or [Path(c).stem for c in args.checkpoints]

    import torch

    from mimsparse.convert.export import load_weights_file
    from mimsparse.evaluate.collapse import analysis_images, feature_collapse, load_timm_model, plot, write_csv

    torch.set_grad_enabled(False)
    stem = Path(args.checkpoints[0]).with_suffix("")
    png = Path(args.output) if args.output else stem.with_name(stem.name + "-collapse.png")
    csv_path = Path(args.csv) if args.csv else stem.with_name(stem.name + "-collapse.csv")

    images = analysis_images(args.images, args.img_size, args.num_images)
    curves, names = {}, set()
    for label, path in zip(labels, args.checkpoints):
        state, metadata = load_weights_file(path)  # an export's header names its model
        model, name = load_timm_model(state, args.model or metadata.get("model_name"))
        names.add(name)
        curves[label] = rows = feature_collapse(model, images, exclude_self=args.exclude_self, where=args.where)
        for r in rows:
            print(f"{label}  layer {r['layer']:3d}  stage {r['stage']}  block {r['block']:2d}  C={r['channels']:4d}  "
                  f"{r['distance']:.4f}")
    write_csv(curves, csv_path)
    plot(curves, png, title=f"{'/'.join(sorted(names))}: feature collapse at {args.where} ({len(images)} images)")
    print(f"wrote {csv_path} and {png} ({len(rows)} blocks, {len(images)} images, {len(curves)} model(s))")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
