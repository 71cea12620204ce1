#!/usr/bin/env python
"""The GPU check: CUDA tests, then the GPU benchmark; JSON + markdown into OUT_DIR, a one-line
summary last. Normally started by scripts/gpu_check.sh (which prepares the environment offline).

  tools/gpu_check.py OUT_DIR                # on a GPU: pytest -m cuda, then tiny/base/resnet50/atto, B=64, 224, bf16
  tools/gpu_check.py OUT_DIR --cpu-smoke    # the same code path on CPU at toy size (tests skip, no compile)

The whole check keeps to --budget-s (default 420 s on a GPU, so that it fits a machine lent for ten
minutes): the tests get at most --test-timeout of it, the models share the rest in order (the targets,
tiny and base, first; then resnet50, SparK's encoder; atto last), and a row not started in time is listed as skipped ("time budget"), never
silently dropped.

Benchmark rows per model (train step img/s and peak memory, r = 0.6 and 0.75): timm dense eager and
compiled, masked-dense compiled, packed eager and compiled (static mode), spconv eager.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# train step only: every compiled row compiles one graph per measure (~0.5-1 min each), 5 per model
GPU = dict(models=("convnextv2_tiny", "convnextv2_base", "resnet50", "convnextv2_atto"), batch=64, img=224, amp="bf16",
           compile=True, repeats=3, warmup=2, measures=("train_step",), budget_s=420, conv_ab_batch=32)
CPU_SMOKE = dict(models=("convnextv2_atto",), batch=2, img=64, amp="bf16", compile=False, repeats=1, warmup=0,
                 measures=("enc_fwd_bwd", "train_step"), budget_s=None, conv_ab_batch=1)
RATIOS = (0.6, 0.75)
BACKENDS = ("dense", "packed", "spconv")


def run_cuda_tests(out: Path, timeout: int) -> dict:
    """pytest -m cuda in a subprocess; counts from its JUnit XML."""
    xml = out / "cuda_tests.xml"
    # only the files that use the marker: collecting the whole suite imports everything (slow)
    files = sorted(str(f) for f in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in f.read_text())
    # -v: a run cut short by the timeout still shows which tests passed
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = f"{e.stdout or ''}{e.stderr or ''}\npytest timed out after {timeout} s", 124
    (out / "cuda_tests.log").write_text(log if isinstance(log, str) else log.decode())
    counts = {"passed": 0, "failed": 0, "skipped": 0, "returncode": rc, "seconds": round(time.time() - t0, 1)}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total = int(suite.get("tests", 0))
        counts["failed"] = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        counts["skipped"] = int(suite.get("skipped", 0))
        counts["passed"] = total - counts["failed"] - counts["skipped"]
        counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                  if c.find("failure") is not None or c.find("error") is not None]
    return counts


def run_conv_ab(out: Path, batch: int, device: str, timeout: int = 90) -> str:
    """benchmarks/gather_conv_ab.py on the device: packed's k x k conv implementations (gather-GEMM, halo
    tiles, dense map) per ResNet-50 conv shape, so the first GPU run says which conv_plan should pick there."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gather_conv_ab.py"), "0.6", str(batch), device]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + (proc.stderr[-2000:] if proc.returncode else "")
    except subprocess.TimeoutExpired as e:
        text = f"{e.stdout or ''}\nstopped after {timeout} s"
    (out / "conv_ab.txt").write_text(text)
    return text


def packed_vs_masked_dense(result: dict, ratio: float = 0.6) -> float | None:
    """images/s of the packed train step over masked-dense's (compiled rows when there are any)."""
    rows = [r for r in result["rows"] if r["mask_ratio"] == ratio and r["train_step"]]
    compiled = any(r.get("compiled") for r in rows)
    pick = {r["backend"]: r for r in rows if bool(r.get("compiled")) == compiled}
    if "packed" not in pick or "dense" not in pick:
        return None
    return pick["packed"]["train_step"]["images_per_s"] / pick["dense"]["train_step"]["images_per_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, toy sizes, no compile: checks this tool itself")
    p.add_argument("--models", default=None, help="comma-separated, overrides the default list")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--test-timeout", type=int, default=180, help="seconds for pytest -m cuda (default 180)")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode of the compiled rows (default: inductor's default)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole check (default 420 on a GPU, none for --cpu-smoke)")
    args = p.parse_args(argv)
    start = time.monotonic()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from mimsparse.benchmark import markdown_table, run_benchmark

    plan = dict(CPU_SMOKE if args.cpu_smoke else GPU)
    if args.models:
        plan["models"] = tuple(m for m in args.models.split(",") if m)
    if args.budget_s is not None:
        plan["budget_s"] = args.budget_s
    plan["compile_mode"] = None if args.compile_mode in (None, "default") else args.compile_mode
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: FAILED: no CUDA device visible to torch {torch.__version__} (use --cpu-smoke on CPU)")
        return 2
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "plan": plan, "benchmarks": []}
    if device == "cuda":  # the project's numbers are TF32-free fp32 / bf16 autocast
        torch.backends.cudnn.benchmark = True
    test_timeout = args.test_timeout
    if plan["budget_s"] is not None:
        test_timeout = int(min(test_timeout, plan["budget_s"] / 2))
    tests = None if args.skip_tests else run_cuda_tests(out, test_timeout)
    report["cuda_tests"] = tests
    if tests is not None:
        print(f"cuda tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
              f"({tests['seconds']} s; log in {out / 'cuda_tests.log'})", flush=True)

    md = [f"# GPU check {report['date']}: {report['gpu'] or 'CPU smoke'}, torch {report['torch']}, "
          f"CUDA {report['cuda']}\n"]
    conv_ab = run_conv_ab(out, plan["conv_ab_batch"], device)
    report["conv_ab"] = conv_ab
    md.append(f"## packed k×k convs per ResNet-50 shape, batch {plan['conv_ab_batch']}, r 0.6 "
              f"(benchmarks/gather_conv_ab.py, fwd+bwd medians)\n\n```\n{conv_ab.strip()}\n```\n")
    ratios = {}
    for i, model in enumerate(plan["models"]):
        t0 = time.time()
        deadline = None
        if plan["budget_s"] is not None:  # this model's share of what is left
            end = start + plan["budget_s"]
            deadline = time.monotonic() + (end - time.monotonic()) / (len(plan["models"]) - i)
            if time.monotonic() > end:
                print(f"time budget: {model} not measured", flush=True)
                report["not_measured"] = report.get("not_measured", []) + [model]
                ratios[model] = None
                continue
        result = run_benchmark(model, BACKENDS, RATIOS, plan["batch"], plan["img"], device, plan["repeats"],
                               plan["warmup"], plan["amp"], plan["compile"], measures=plan["measures"],
                               compiled_only=("dense",), log=lambda *a: print(*a, flush=True), deadline=deadline,
                               compile_mode=plan["compile_mode"])
        result["seconds"] = round(time.time() - t0, 1)
        report["benchmarks"].append(result)
        ratios[model] = packed_vs_masked_dense(result)
        md.append(f"## {model}, batch {plan['batch']}, {plan['img']}², amp {plan['amp']}, {device} "
                  f"({result['seconds']} s)\n\n{markdown_table(result)}\n")
        if result["rows"] and result["rows"][0].get("peak_cuda_mb") is not None:
            md.append("Peak CUDA memory (MB): " + ", ".join(
                f"{r['backend']}{' (compiled)' if r.get('compiled') else ''} r={r['mask_ratio']}: "
                f"{r['peak_cuda_mb']:.0f}" for r in result["rows"]) + "\n")
        # written after every model: a run cut short still leaves its finished tables
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text("\n".join(md))

    tests_txt = ("tests skipped" if tests is None else
                 f"cuda tests {tests['passed']} passed/{tests['failed']} failed/{tests['skipped']} skipped")
    kind = "compiled" if plan["compile"] else "eager"
    ratio_txt = ", ".join(f"{m.replace('convnextv2_', '')} {'–' if r is None else f'{r:.2f}x'}"
                          for m, r in ratios.items())
    ok = tests is None or (tests["failed"] == 0 and tests["returncode"] in (0, 5))
    summary = (f"gpu_check: {'OK' if ok else 'FAILED'} | {report['gpu'] or 'CPU smoke'} | {tests_txt} | "
               f"packed / {kind} masked-dense train img/s at r=0.6: {ratio_txt} | "
               f"{time.monotonic() - start:.0f} s | {out}")
    report["summary"] = summary
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text("\n".join(md + [f"\n{summary}\n"]))
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
