#!/usr/bin/env python
"""Backend throughput benchmark; writes JSON, a markdown table and a PNG plot.

  tools/benchmark.py --model convnextv2_atto --backends dense,spconv,minkowski,packed \
      --mask-ratios 0,0.3,0.6,0.75,0.9 --batch 8 --img 224 --device cpu --repeats 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_atto", help="convnextv2_<size> or resnet18|34|50|101")
    p.add_argument("--backends", default="dense,packed,spconv,minkowski")
    p.add_argument("--mask-ratios", default="0,0.3,0.6,0.75,0.9")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true",
                   help="also measure timm dense, dense and packed under torch.compile (spconv/minkowski stay eager)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--measures", default="enc_fwd,enc_fwd_bwd,train_step",
                   help="subset to time (each compiled row compiles one graph per measure)")
    p.add_argument("--out-dir", default="benchmarks", help="where <name>.json/.md/.png go")
    p.add_argument("--name", default=None, help="file stem (default: model_device)")
    args = p.parse_args(argv)

    from mimsparse.benchmark import markdown_table, plot, run_benchmark
    from mimsparse.train.run_log import json_safe

    result = run_benchmark(args.model, [b for b in args.backends.split(",") if b],
                           [float(r) for r in args.mask_ratios.split(",")], args.batch, args.img, args.device,
                           args.repeats, args.warmup, args.amp, args.compile,
                           compile_mode=None if args.compile_mode == "default" else args.compile_mode,
                           measures=tuple(m for m in args.measures.split(",") if m))
    result["command"] = "tools/benchmark.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result["date"] = datetime.date.today().isoformat()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{args.model}_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
    table = markdown_table(result)
    m = result["machine"]
    header = (f"`{result['command']}` — {result['date']}, {m['processor']}, {m['cpu_threads']} threads"
              f"{', ' + m['gpu'] if 'gpu' in m else ''}, torch {m['torch']}, timm {m['timm']}\n\n")
    (out / f"{stem}.md").write_text(header + table + "\n")
    plot(result, out / f"{stem}.png")
    print(header + table)
    print(f"\nwrote {out / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
