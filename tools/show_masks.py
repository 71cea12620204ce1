#!/usr/bin/env python
"""Draw every mask strategy on real photos: one row per image, one column per strategy (masked
patches grey; the progressive strategy at 0%, 50% and 100% of training).

  tools/show_masks.py [-o masks.png] [--image photo.jpg ...] [--img 224x320] [--seed 0]
      [--config YAML] [mask.key=value ...]

Without --image the first photo bundled with scikit-image is used. The strategies' settings come
from the config's mask section (mask.strategy itself is ignored: every strategy is drawn).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

PROGRESS = (0.0, 0.5, 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default="masks.png", help="PNG to write (default: masks.png)")
    p.add_argument("--image", action="append", default=None, help="image file (repeat for several rows)")
    p.add_argument("--img", default="224x320", help="N or HxW, multiples of 32 (default: 224x320)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--config", default=None, help="YAML whose mask section sets the strategies' options")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. mask.ratio=0.75 mask.block_min_patches=2")
    from mimsparse.cli import parse_with_overrides

    args = parse_with_overrides(p, argv)  # overrides may stand anywhere among the options

    import torch

    from mimsparse.models.build import build_encoder, build_masker
    from mimsparse.config import load_config
    from mimsparse.train.data import bundled_photo_paths
    from mimsparse.masking import upsample_mask
    from mimsparse.visualize import MASKED_GRAY, load_image, parse_size, save_grid, unnormalize

    cfg = load_config(args.config, args.overrides)
    patch = build_encoder(cfg.model).patch_size  # the encoder's total stride (32 for ConvNeXt V2)
    size = parse_size(args.img)
    paths = args.image or bundled_photo_paths()[:1]
    images = torch.cat([load_image(path, size, patch) for path in paths])
    original = unnormalize(images)
    panels = {"original": original}
    columns = [("random", 0.0), ("block", 0.0), *[("progressive", t) for t in PROGRESS], ("importance", 0.0)]
    for strategy, progress in columns:
        masker = build_masker(dataclasses.replace(cfg.mask, strategy=strategy))
        visible = masker(images, patch, torch.Generator().manual_seed(args.seed), progress)
        keep = upsample_mask(visible, patch).unsqueeze(1)
        ratio = masker.ratio_at(progress)
        title = f"progr. at {progress:.0%}: {ratio:.0%}" if strategy == "progressive" else f"{strategy} {ratio:.0%}"
        panels[title] = torch.where(keep, original, torch.full_like(original, MASKED_GRAY))
    out = save_grid(panels, Path(args.output))
    h, w = size
    print(f"wrote {out}: {len(paths)} image(s) at {h}x{w} ({h // patch}x{w // patch} patches), "
          f"columns: {', '.join(panels)}")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
