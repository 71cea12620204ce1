#!/usr/bin/env python
"""Data-loading throughput: images/s of decode + augment, from a folder and from tar shards of the same
images, for each data.num_workers; writes JSON and a markdown table.

  tools/benchmark_data.py [--data DIR] --img-size 224 --workers 0,1,2 --batch-size 16 --batches 12 --repeats 3

Size data.num_workers so that the loader's img/s exceeds the train step's img/s (tools/benchmark.py).
Results go to a new run folder runs/benchmark/<date-time>-data/ unless --output-dir says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path


def main(argv=None) -> int:
    from mimsparse.cli_args import add_batch_size, add_img_size, add_output_dir

    p = argparse.ArgumentParser("benchmark_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder of images (default: scikit-image's bundled photos, full size)")
    add_img_size(p, "224", "crop size, N or HxW (default %(default)s)")
    p.add_argument("--workers", default="0,1,2", help="data.num_workers values to measure (default %(default)s)")
    add_batch_size(p, 16)
    p.add_argument("--batches", type=int, default=12, help="batches per measurement (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=4, help="images per shard of the packed copy (default %(default)s)")
    add_output_dir(p, None, "where data.json/.md go (default: a new folder runs/benchmark/<date-time>-data/)")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = p.parse_args(argv)

    from mimsparse.data_benchmark import markdown_table, run_data_benchmark
    from mimsparse.errors import ConfigError
    from mimsparse.visualize import parse_size

    now = datetime.datetime.now()
    out = Path(args.output_dir) if args.output_dir else Path("runs/benchmark") / f"{now:%Y%m%d-%H%M%S}-data"
    if (out / "data.json").exists() and not args.overwrite:
        raise ConfigError(f"{out / 'data.json'} exists; pick another --output-dir or pass --overwrite")
    workers = [int(w) for w in args.workers.split(",") if w]
    if args.batches < 2 + max(workers):
        raise ConfigError(f"--batches must be at least 2 + the most workers ({2 + max(workers)}): the first batch "
                          f"is not timed")
    result = run_data_benchmark(args.data, parse_size(str(args.img_size)), workers=workers,
                                batch_size=args.batch_size, batches=args.batches, repeats=args.repeats,
                                shard_size=args.shard_size)
    result["command"] = "tools/benchmark_data.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result["date"] = now.isoformat(timespec="minutes")
    result["load_average"] = list(os.getloadavg())
    result["cpu_count"] = os.cpu_count()
    import torch

    result["torch_threads"] = torch.get_num_threads()  # the main process's (workers use 1 each)
    header = (f"`{result['command']}` — {result['date']}, {result['cpu_count']} CPUs, {result['torch_threads']} "
              f"torch thread(s) in the main process, load average "
              f"{' '.join(f'{v:.2f}' for v in result['load_average'])}, {result['images']} images, "
              f"crops {args.img_size}\n\n")
    table = markdown_table(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(result, indent=1))
    (out / "data.md").write_text(header + table + "\n")
    print(header + table)
    print(f"\nwrote {out / 'data'}.json, .md")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
