#!/usr/bin/env python
"""Pack a folder of images into webdataset tar shards for pretraining (data.path / --data PATTERN).

  tools/make_shards.py FOLDER OUT_DIR --shard-size 1000
  tools/pretrain.py --data 'OUT_DIR/train-{000000..000009}.tar' ...      (the pattern it prints)

FOLDER is an ImageFolder (class folders) or a flat folder. The files are shuffled (--seed) so each
shard mixes the classes, and stored as they are (no re-encoding). A worker of the training data
loader reads whole shards: write at least (processes x data.num_workers) shards.
"""
from __future__ import annotations

import argparse
import sys


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("make_shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="ImageFolder or flat folder of images")
    p.add_argument("output_dir", metavar="OUT_DIR", help="folder for the shards (created; must hold none yet)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default %(default)s)")
    p.add_argument("--prefix", default="train", help="shard file names: PREFIX-000000.tar ... (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before packing (default %(default)s)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    return p


def main(argv=None) -> int:
    from mimsparse.train.shards import count_samples, write_shards

    args = get_args_parser().parse_args(argv)
    shards, pattern = write_shards(args.folder, args.output_dir, args.shard_size, args.prefix,
                                   seed=None if args.no_shuffle else args.seed)
    total = sum(count_samples(s) for s in shards)
    print(f"wrote {total} images into {len(shards)} shard(s) of up to {args.shard_size}: {pattern}")
    print(f"pretrain on them: tools/pretrain.py --data '{pattern}' ...")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
