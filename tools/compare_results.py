#!/usr/bin/env python
"""Mean and spread of final top-1 over seeds, one row per group of runs (results.json of
tools/finetune.py / tools/linear_probe.py), as a markdown table.

  tools/compare_results.py "probe pretrained=runs/fmnist/probe-pre-s*" "probe random=runs/fmnist/probe-rand-s*"
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", metavar="LABEL=GLOB", help="run folders holding results.json")
    p.add_argument("-o", "--output", default=None, help="also write the table to this file")
    args = p.parse_args(argv)

    from mimsparse.errors import ConfigError, DataError

    lines = ["| runs | seeds | final top-1 (mean ± std) | per seed | best-epoch top-1 (mean) |", "|---|---|---|---|---|"]
    for group in args.groups:
        label, sep, pattern = group.partition("=")
        if not sep:
            raise ConfigError(f"{group!r}: expected LABEL=GLOB")
        files = sorted(Path(d) / "results.json" for d in glob.glob(pattern))
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"{label}: no results.json under {pattern!r}; run the tool first")
        results = [json.loads(f.read_text()) for f in files]
        final = [100 * r["final_top1"] for r in results]
        best = [100 * r["best_top1"] for r in results]
        spread = statistics.stdev(final) if len(final) > 1 else 0.0
        lines.append(f"| {label} | {len(final)} | {statistics.mean(final):.2f} ± {spread:.2f} % | "
                     f"{', '.join(f'{v:.2f}' for v in final)} | {statistics.mean(best):.2f} % |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
