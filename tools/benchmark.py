#!/usr/bin/env python
"""Backend throughput benchmark; writes JSON, a markdown table and a PNG plot.

  tools/benchmark.py --model convnextv2_atto --backends dense,spconv,minkowski,packed \
      --mask-ratios 0,0.3,0.6,0.75,0.9 --batch-size 8 --img-size 224 --device cpu --repeats 5

Results go to a new run folder runs/benchmark/<date-time>-<model>_<device>/ unless --output-dir says otherwise;
existing files are never replaced without --overwrite.
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
    from mimsparse.cli_args import add_batch_size, add_img_size, add_output_dir

    add_batch_size(p, 8)
    add_img_size(p, "224", "input size, N or HxW (multiples of 32; default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true",
                   help="also measure timm dense, dense and packed under torch.compile (spconv/minkowski stay eager)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--measures", default="enc_fwd,enc_fwd_bwd,train_step",
                   help="subset to time (each compiled row compiles one graph per measure)")
    add_output_dir(p, None, "where <name>.json/.md/.png go (default: a new run folder "
                   "runs/benchmark/<date-time>-<model>_<device>/; the committed benchmarks/ is only written with "
                   "--output-dir benchmarks --overwrite)")
    p.add_argument("--name", default=None, help="file stem (default: model_device)")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files of the same name")
    args = p.parse_args(argv)

    from mimsparse.benchmark import markdown_table, noisy_rows, plot, run_benchmark
    from mimsparse.errors import ConfigError
    from mimsparse.train.run_log import json_safe
    from mimsparse.visualize import parse_size

    height, width = parse_size(str(args.img_size))
    stem = args.name or f"{args.model}_{args.device}"
    now = datetime.datetime.now()
    out = Path(args.output_dir) if args.output_dir else Path("runs/benchmark") / f"{now:%Y%m%d-%H%M%S}-{stem}"
    existing = [out / f"{stem}{ext}" for ext in (".json", ".md", ".png") if (out / f"{stem}{ext}").exists()]
    if existing and not args.overwrite:  # checked before minutes of measuring
        raise ConfigError(f"{existing[0]} exists (a committed result?); pick another --output-dir or --name, "
                          f"or pass --overwrite")
    result = run_benchmark(args.model, [b for b in args.backends.split(",") if b],
                           [float(r) for r in args.mask_ratios.split(",")], args.batch_size, (height, width),
                           args.device, args.repeats, args.warmup, args.amp, args.compile,
                           compile_mode=None if args.compile_mode == "default" else args.compile_mode,
                           measures=tuple(m for m in args.measures.split(",") if m))
    result["command"] = "tools/benchmark.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result["date"] = now.date().isoformat()
    noisy = noisy_rows(result)
    result["noisy_rows"] = noisy
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
    table = markdown_table(result)
    m = result["machine"]
    header = (f"`{result['command']}` — {result['date']}, {m['processor']}, {m['cpu_threads']} threads"
              f"{', ' + m['gpu'] if 'gpu' in m else ''}, torch {m['torch']}, timm {m['timm']}\n\n")
    (out / f"{stem}.md").write_text(header + table + "\n")
    plot(result, out / f"{stem}.png")
    print(header + table)
    if noisy:
        print(f"\nwarning: the machine was noisy: {len(noisy)} timing(s) spread more than 25 % of their median "
              f"(busy cores?); rerun on an idle machine or with more --repeats before comparing:\n  " + "\n  ".join(noisy))
    print(f"\nwrote {out / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
