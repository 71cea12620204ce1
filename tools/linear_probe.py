#!/usr/bin/env python
"""Linear probe (MAE protocol): train BatchNorm (no affine) + Linear on the frozen encoder's globally
average-pooled forward_features, computed once per image without augmentation; report top-1 on the
test split per epoch and at the end.

  tools/linear_probe.py --checkpoint runs/fcmae_atto/checkpoint-0000160.pth --data lfw-subset --img-size 64
  tools/linear_probe.py --checkpoint atto-timm.pth --model convnextv2_atto --data fashion-mnist --img-size 64 \\
      --train-limit 5000
  tools/linear_probe.py --checkpoint random --model convnextv2_atto --data DIR          # the baseline

--checkpoint and --data as for tools/finetune.py. Optimiser: SGD, momentum 0.9, per-step warm-up + cosine,
weight decay 0 (MAE uses LARS at batch 16384; plain SGD suits cached features and small batches).
Writes <output-dir>/log.jsonl (one line per epoch) and results.json.
"""
from __future__ import annotations

import argparse
import os
import sys


def get_args_parser() -> argparse.ArgumentParser:
    from mimsparse.evaluate.finetune import weights_and_data_args

    p = argparse.ArgumentParser("linear_probe", description=__doc__, parents=[weights_and_data_args()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/linear_probe", help="log.jsonl, results.json (default %(default)s)")
    p.add_argument("--train-limit", type=int, default=0, help="probe on about N training images, stratified, drawn "
                   "from --seed (default: all)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--warmup-epochs", type=float, default=10.0, help="linear warm-up, then cosine, per step")
    p.add_argument("--batch-size", type=int, default=256, help="probe batch (capped at the number of training images)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (overrides --blr)")
    p.add_argument("--blr", type=float, default=0.1, help="base learning rate: without --lr, lr = blr x batch size "
                   "/ 256 (default %(default)s)")
    p.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="training subset, head init, batch order")
    p.add_argument("--overwrite", action="store_true", help="replace the results of another probe in --output-dir "
                   "(without it such a start is refused; a probe is short: it has no --resume)")
    p.add_argument("--extract-batch-size", type=int, default=64, help="images per forward pass of the encoder")
    return p


def main(argv=None) -> int:
    from mimsparse.cli_args import resolve_checkpoint

    p = get_args_parser()
    args = p.parse_args(argv)
    resolve_checkpoint(p, args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mimsparse.errors import ConfigError

        raise ConfigError("the linear probe runs in one process (each image's features are computed once and the "
                          "probe trains on them in seconds): start it with python, not torchrun or tools/launch.py")
    from mimsparse.evaluate.linear_probe import main as linear_probe

    linear_probe(args)
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
