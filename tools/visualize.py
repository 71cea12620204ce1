#!/usr/bin/env python
"""Reconstruct images with a pretraining checkpoint and save a PNG grid, one row per image:
original | masked input | reconstruction | reconstruction with the visible patches pasted back.

  tools/visualize.py runs/fcmae_atto/checkpoint-0000160.pth --image photo.jpg [--image b.png] [-o out.png]
      [--img-size 224 | --img-size 192x320] [--mask-ratio 0.6] [--seed 0] [--backend dense]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from mimsparse.backends import backend_names

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from mimsparse.cli_args import add_checkpoint, add_img_size, resolve_checkpoint

    add_checkpoint(p, "checkpoint written by tools/pretrain.py")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several rows)")
    p.add_argument("-o", "--output", default=None, help="PNG to write (default: <checkpoint>-vis.png)")
    add_img_size(p, None,
                   "N or HxW, multiples of 32: the image is scaled to cover it and centre-cropped "
                        "(default: the checkpoint's data.img_size)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="fraction of patches hidden (default: the checkpoint's mask.ratio; the mask strategy is "
                        "the checkpoint's mask.strategy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--backend", default="dense", choices=backend_names(),
                   help="sparse backend (any can load any checkpoint)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    resolve_checkpoint(p, args)

    import torch

    from mimsparse.models.build import build_fcmae
    from mimsparse.train.checkpoint import CheckpointError, load_checkpoint
    from mimsparse.config import config_from_dict
    from mimsparse.visualize import load_image, parse_size, reconstruct, save_grid

    ckpt = load_checkpoint(args.checkpoint)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{args.checkpoint} is not a pretraining checkpoint (no config/model); "
                              f"converted timm weights cannot reconstruct images")
    cfg = ckpt["config"]
    if args.mask_ratio is not None:
        cfg = {**cfg, "mask": {**cfg.get("mask", {}), "ratio": args.mask_ratio}}
    cfg = config_from_dict(cfg)
    model = build_fcmae(cfg, args.backend)
    model.load_state_dict(ckpt["model"], strict=True)
    model.to(args.device).eval()

    size = parse_size(args.img_size) if args.img_size else cfg.data.size_hw
    images = torch.cat([load_image(path, size, model.patch_size) for path in args.image]).to(args.device)
    # progress=1: a strategy whose ratio changes during training (progressive) shows its final ratio
    visible = model.make_mask(images, torch.Generator().manual_seed(args.seed), progress=1.0)
    out = Path(args.output) if args.output else Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "-vis.png")
    save_grid(reconstruct(model, images, visible), out)
    hidden = 1.0 - visible.float().mean().item()
    print(f"wrote {out}: {len(args.image)} image(s) at {size[0]}x{size[1]}, {hidden:.0%} of the patches hidden, "
          f"{cfg.model.name} step {ckpt.get('run', {}).get('step', '?')}")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
