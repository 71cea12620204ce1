#!/usr/bin/env python
"""The papers' ablations at small scale (docs/ablations.md): sparse vs leaky dense encoder, mask ratio
0.4/0.6/0.75/0.9, GRN on/off, each pretrained per seed on an equal budget and evaluated by linear probe,
short finetune at a low label fraction and the feature-collapse statistic.
  tools/ablate.py                                   # every variant, seeds 0 1, the budget of docs/ablations.md
  tools/ablate.py --variants sparse-r0.6-grn leaky-r0.6-grn --seeds 0
  tools/ablate.py --summary-only                    # tables of what has finished
Resumable: a run whose result.json exists is skipped, an interrupted pretraining resumes from its last
checkpoint (written every --checkpoint-steps steps) and a finished probe / finetune is not redone. Writes
<out>/<variant>/s<seed>/result.json (the full pretraining config, the budget, every metric, wall and CPU
time and the load average), <out>/summary.md and <out>/collapse.png (Fig. 3: with and without GRN).
Random init and the baseline run for every seed first
(the comparison every claim rests on), then the other variants seed-major.
Processes with the same budget may share <out> (scripts/ablation_budget_search.sh runs two): each holds
the run it works on, skips runs another process holds, and waits for the floor's runs before checking it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    from mimsparse.evaluate.ablation import VARIANTS, Budget

    p = argparse.ArgumentParser("ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablations", help="results folder (default %(default)s)")
    p.add_argument("--config", default=str(ROOT / "configs" / "ablation_fmnist.yaml"), help="base pretraining config")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help=f"subset of: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--backend", default="packed", help="sparse backend of the pretraining (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint-steps", "--segment-steps", type=int, default=100, dest="checkpoint_steps",
                   help="pretraining checkpoint every N steps (train.save_every_steps), so a killed job loses at most "
                        "N (0 = at epoch ends only; default %(default)s; does not change the results)")
    p.add_argument("--require-floor", type=float, default=None, metavar="POINTS",
                   help="after random init and the baseline of every seed, go on to the other variants only if the "
                        "baseline beats random init by POINTS probe points (paired mean, seeds not overlapping); "
                        "otherwise stop with exit status 3 (a budget search tries a larger budget)")
    p.add_argument("--summary-only", action="store_true", help="only write <out>/summary.md from finished runs")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of another budget in --out (without it "
                   "such a start is refused; the same budget always resumes)")
    for f in fields(Budget):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"budget (default %(default)s)")
    return p


def _tool(name: str):
    """The main() of tools/<name>.py, run in this process (no interpreter start-up per step)."""
    spec = importlib.util.spec_from_file_location(f"_ablate_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def main(argv) -> int:
        from mimsparse.train.stop_signal import STOP_EXIT_STATUS

        status = module.main(argv)
        if status == STOP_EXIT_STATUS:  # a signal stopped the step with a checkpoint: the ablation stops too
            raise SystemExit(STOP_EXIT_STATUS)
        return status

    return main


def pretrain(run_dir: Path, variant, seed: int, budget, args) -> tuple[Path, dict]:
    """Pretrains (or resumes) the variant; returns its last checkpoint and a summary of the run."""
    from mimsparse.evaluate.datasets import load_labelled
    from mimsparse.train.checkpoint_manager import latest_checkpoint

    out = run_dir / "pretrain"
    n_train = len(load_labelled(budget.data, "train"))
    warmup_epochs = 0.1 * budget.steps * budget.batch_size / n_train  # warm up over the first 10 % of the steps
    # The cosine spans train.epochs: whole epochs of steps, so a budget of whole epochs decays to the end.
    epochs = max(1, math.ceil(budget.steps * budget.batch_size / n_train))
    overrides = [f"data.path={budget.data}", f"data.img_size={budget.img_size}", f"train.batch_size={budget.batch_size}",
                 f"train.epochs={epochs}", f"optim.warmup_epochs={warmup_epochs:.6g}", f"train.seed={seed}",
                 f"train.output_dir={out}", f"train.max_steps={budget.steps}",
                 f"train.save_every_steps={args.checkpoint_steps}", *variant.overrides]
    t0 = time.perf_counter()
    _tool("pretrain")(["--config", args.config, "--backend", args.backend, "--device", args.device,
                       "--resume", "auto", "--no-progress", *overrides])
    ckpt = latest_checkpoint(out)
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [v for v in losses if v is not None]
    tail = losses[-max(1, len(losses) // 5):]
    return ckpt, {"checkpoint": str(ckpt), "overrides": overrides, "first_loss": losses[0] if losses else None,
                  "final_loss": sum(tail) / len(tail) if tail else None, "wall_s_this_call": time.perf_counter() - t0}


def evaluate(run_dir: Path, weights: list[str], seed: int, budget, device: str) -> dict:
    common = [*weights, "--data", budget.data, "--img-size", str(budget.img_size), "--eval-limit",
              str(budget.eval_limit), "--seed", str(seed), "--device", device, "--no-progress"]
    out = {}
    probe_dir, ft_dir = run_dir / "probe", run_dir / "finetune"
    if not (probe_dir / "results.json").is_file():
        _tool("linear_probe")([*common, "--overwrite", "--train-limit", str(budget.probe_train), "--epochs", str(budget.probe_epochs),
                               "--warmup-epochs", str(max(1, budget.probe_epochs // 10)), "--output-dir", str(probe_dir)])
    if not (ft_dir / "results.json").is_file():
        _tool("finetune")([*common, "--label-fraction", str(budget.finetune_fraction), "--epochs",
                           str(budget.finetune_epochs), "--warmup-epochs", "0.5", "--batch-size", str(budget.finetune_batch), "--blr", str(budget.finetune_blr),
                           "--resume", "auto", "--output-dir", str(ft_dir)])
    for name, folder in (("probe", probe_dir), ("finetune", ft_dir)):
        r = json.loads((folder / "results.json").read_text())
        out[name] = {k: r[k] for k in ("final_top1", "best_top1", "best_epoch", "args", "data", "wall_time_s") if k in r}
    return out


def collapse(ckpt: Path | None, seed: int, budget) -> dict:
    """Mean / min over blocks of the channel cosine distance, before GRN (mlp) and after it (grn)."""
    import timm
    import torch

    from mimsparse.evaluate.collapse import analysis_images, feature_collapse, load_timm_model
    from mimsparse.train.checkpoint import load_checkpoint

    if ckpt is not None:
        model, _ = load_timm_model(load_checkpoint(ckpt))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model("convnextv2_atto").eval()
    images = analysis_images(budget.data, budget.img_size, budget.collapse_images)
    out = {}
    with torch.no_grad():
        for where in ("mlp", "grn"):
            d = [r["distance"] for r in feature_collapse(model, images, where=where)]
            out[where] = {"mean": sum(d) / len(d), "min": min(d), "per_block": d}
    return out


def run_one(out_dir: Path, variant, seed: int, budget, args) -> Path:
    from mimsparse.evaluate.ablation import run_name
    from mimsparse.config import config_from_dict
    from mimsparse.train.checkpoint import load_checkpoint

    run_dir = out_dir / run_name(variant.name, seed)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        print(f"[ablate] {variant.name} seed {seed}: done, skipped ({result_path})")
        return result_path
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[ablate] {variant.name} seed {seed}: start", flush=True)
    t0, cpu0, load0, start = time.perf_counter(), _cpu_s(), os.getloadavg(), _utc()
    record = {"variant": variant.name, "seed": seed, "budget": budget.to_dict(), "backend": args.backend}
    if variant.pretrained:
        ckpt, record["pretrain"] = pretrain(run_dir, variant, seed, budget, args)
        record["pretrain_config"] = config_from_dict(load_checkpoint(ckpt)["config"]).to_dict()
        weights = ["--ckpt", str(ckpt)]
    else:
        ckpt, weights = None, ["--ckpt", "random", "--model", "convnextv2_atto"]
        record["pretrain"] = record["pretrain_config"] = None
    record.update(evaluate(run_dir, weights, seed, budget, args.device))
    record["collapse"] = collapse(ckpt, seed, budget)
    record["wall_s_this_call"] = time.perf_counter() - t0
    # What this call cost on a shared machine: its CPU share is cpu_s / wall_s.
    record["machine"] = {"start_utc": start, "end_utc": _utc(), "cpu_s_this_call": _cpu_s() - cpu0,
                         "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
                         "nice": os.nice(0), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(result_path)  # atomic: a result.json is always a finished run
    print(f"[ablate] {variant.name} seed {seed}: probe {record['probe']['final_top1']:.2%}, finetune "
          f"{record['finetune']['final_top1']:.2%}, {record['wall_s_this_call']:.0f} s", flush=True)
    return result_path


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from mimsparse.evaluate.ablation import FLOOR, VARIANTS, Budget, floor_cleared, load_results, run_order
    from mimsparse.evaluate.ablation_report import collapse_figure, summary_markdown

    from mimsparse.train.checkpoint import write_text_atomic
    from mimsparse.train.run_folder import clear_run_files, held, refuse_other_run

    out_dir = Path(args.out)
    budget = Budget(**{f.name: getattr(args, f.name) for f in fields(Budget)})
    if not args.summary_only:
        # The folder is held only to check and write the budget: processes with the same budget share it
        # (each run folder is held by the process running it); another budget's runs are another ablation's.
        with held(out_dir, "ablate.py") as folder:
            budget_path = out_dir / "budget.json"
            if budget_path.is_file() and json.loads(budget_path.read_text()) != budget.to_dict():
                theirs = [budget_path, out_dir / "summary.md", *(out_dir / name for name in VARIANTS)]
                clear_run_files(out_dir, refuse_other_run(out_dir, theirs, False, args.overwrite, resumable=False,
                                                          folder_flag="--out"))
            write_text_atomic(budget_path, json.dumps(budget.to_dict(), indent=1))
            folder.started = True
        order = run_order(args.variants, args.seeds)
        for i, (name, seed) in enumerate(order):
            if args.require_floor is not None and name not in FLOOR and (i == 0 or order[i - 1][0] in FLOOR):
                ok, text = floor_cleared(load_results(out_dir), args.require_floor)
                print(f"[ablate] {text}", flush=True)
                if not ok:
                    write_text_atomic(out_dir / "summary.md", summary_markdown(out_dir))
                    print(f"[ablate] stopped before the other variants (--require-floor {args.require_floor:g})")
                    return 3
            # the floor's runs must all be finished before its check: wait for one another process has
            wait = args.require_floor is not None and name in FLOOR
            run_held(out_dir, VARIANTS[name], seed, budget, args, wait)
    summary = summary_markdown(out_dir)
    write_text_atomic(out_dir / "summary.md", summary)
    print(summary)
    figure = collapse_figure(out_dir)
    if figure is not None:
        print(f"Fig. 3 comparison (channel distance per block, with and without GRN): {figure}")
    return 0


def run_held(out_dir: Path, variant, seed: int, budget, args, wait: bool, poll_s: float = 15.0) -> None:
    """``run_one`` while holding the run's folder. A run another process holds is skipped, or with
    ``wait`` waited for (and run here if that process ends without finishing it)."""
    from mimsparse.evaluate.ablation import run_name
    from mimsparse.train.run_folder import FolderBusy, held

    run_dir = out_dir / run_name(variant.name, seed)
    said = False
    while True:
        try:
            with held(run_dir, "ablate.py") as folder:
                folder.started = True  # a failed run keeps its checkpoints: the next call resumes them
                run_one(out_dir, variant, seed, budget, args)
                return
        except FolderBusy:
            if not wait:
                print(f"[ablate] {variant.name} seed {seed}: another process is running it, skipped", flush=True)
                return
            if not said:
                print(f"[ablate] {variant.name} seed {seed}: another process is running it, waiting", flush=True)
                said = True
            time.sleep(poll_s)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from mimsparse.cli import run_cli
    sys.exit(run_cli(main))
