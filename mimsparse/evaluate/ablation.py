"""The papers' ablations at small scale: which variants, on what budget, and the tables of their results.

Three claims (ConvNeXt V2, SparK), each a table over variants that differ from one baseline run
(sparse encoder, mask ratio 0.6, GRN) in one setting, so the baseline is trained once per seed:

- sparse vs leaky: ``model.encoder_input=masked_image_dense`` (mask applied once at the input);
- mask ratio: 0.4 / 0.6 / 0.75 / 0.9;
- GRN: on / off.

Every variant is pretrained per seed, then evaluated by a linear probe, a short finetune at a low
label fraction and the feature-collapse statistic. ``tools/ablate.py`` runs them; this module holds the
plan and turns the per-run ``result.json`` files into tables.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]  # config overrides on top of the base config; None-like "random" = no pretraining
    pretrained: bool = True


BASELINE = Variant("sparse-r0.6-grn", ())
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    BASELINE,
    Variant("leaky-r0.6-grn", ("model.encoder_input=masked_image_dense",)),
    Variant("sparse-r0.4-grn", ("mask.ratio=0.4",)),
    Variant("sparse-r0.75-grn", ("mask.ratio=0.75",)),
    Variant("sparse-r0.9-grn", ("mask.ratio=0.9",)),
    Variant("sparse-r0.6-nogrn", ("model.use_grn=false",)),
    Variant("random-init", (), pretrained=False),  # the floor every pretrained variant should clear
)}


# The comparison every claim rests on: a pretrained baseline that does not clearly beat random init
# makes the three tables unreadable, so the harness runs these two for every seed before the rest.
FLOOR = (BASELINE.name, "random-init")


def run_order(variants: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(variant, seed) in the order to run them: random init and the baseline for every seed first
    (random init, an evaluation only, first per seed), then the other variants seed-major, so a
    partial run covers every variant once."""
    floor = [v for v in ("random-init", BASELINE.name) if v in variants]
    rest = [v for v in variants if v not in floor]
    return [(v, s) for s in seeds for v in floor] + [(v, s) for s in seeds for v in rest]


def floor_cleared(results: dict[str, list[dict]], margin: float) -> tuple[bool, str]:
    """Whether the baseline beats random init on the linear probe by at least ``margin`` points, paired
    by seed on average, with every baseline seed above every random-init seed (non-overlapping), and a
    one-line account of it."""
    base = {r["seed"]: 100 * r["probe"]["final_top1"] for r in results.get(BASELINE.name, [])}
    rand = {r["seed"]: 100 * r["probe"]["final_top1"] for r in results.get("random-init", [])}
    seeds = sorted(set(base) & set(rand))
    if not seeds:
        return False, "no seed has both the baseline and random init finished"
    diffs = [base[s] - rand[s] for s in seeds]
    mean = statistics.mean(diffs)
    separate = min(base[s] for s in seeds) > max(rand[s] for s in seeds)
    ok = mean >= margin and separate
    text = (f"baseline - random init on the probe, paired by seed: {mean:+.2f} points ("
            f"{', '.join(f's{s}: {d:+.2f}' for s, d in zip(seeds, diffs))}); seeds "
            f"{'do not overlap' if separate else 'overlap'}; {'clears' if ok else 'does not clear'} {margin:g} points")
    return ok, text


@dataclass(frozen=True)
class Claim:
    title: str
    paper: str          # what the papers report, in one line
    rows: tuple[str, ...]


CLAIMS = (
    Claim("Sparse convolution vs the leaky dense encoder",
          "sparse > leaky dense (ConvNeXt V2 Table 1: sparse conv is needed; SparK Sec. 3.1)",
          ("sparse-r0.6-grn", "leaky-r0.6-grn", "random-init")),
    Claim("Mask ratio",
          "0.6 best for FCMAE (ConvNeXt V2 Fig. 5; MAE uses 0.75 for ViTs); 0.4 and 0.9 worse",
          ("sparse-r0.4-grn", "sparse-r0.6-grn", "sparse-r0.75-grn", "sparse-r0.9-grn", "random-init")),
    Claim("GRN",
          "GRN on > off, and GRN removes feature collapse (ConvNeXt V2 Sec. 3.2, Table 2)",
          ("sparse-r0.6-grn", "sparse-r0.6-nogrn", "random-init")),
)


@dataclass(frozen=True)
class Budget:
    """Everything that sizes a run; stored with every result and checked when a run is resumed. The
    defaults fit all 14 runs into about an hour of one loaded CPU core (docs/ablations.md)."""
    data: str = "fashion-mnist"
    img_size: int = 96              # a 3x3 grid of 32x32 patches: ratios 0.4/0.6/0.75/0.9 mask 4/5/7/8 of 9
    steps: int = 30                 # pretraining steps per run
    batch_size: int = 32
    probe_train: int = 600          # linear probe: stratified training images (frozen GAP features)
    probe_epochs: int = 30
    eval_limit: int = 500           # stratified test images for probe and finetune (the same for every run)
    finetune_fraction: float = 0.005  # finetune: fraction of the labelled training images (300 of 60k)
    finetune_epochs: int = 1
    finetune_batch: int = 32
    finetune_blr: float = 8e-3      # lr = blr x batch / 256 = 1e-3: a 10-step finetune needs a high lr to move at all
    collapse_images: int = 32       # test images for the feature-collapse statistic

    def to_dict(self) -> dict:
        return asdict(self)


def run_name(variant: str, seed: int) -> str:
    return f"{variant}/s{seed}"


def load_results(out_dir: str | Path) -> dict[str, list[dict]]:
    """variant name -> the result.json records of its finished seeds, by seed."""
    found: dict[str, list[dict]] = {}
    for path in sorted(Path(out_dir).glob("*/s*/result.json")):
        record = json.loads(path.read_text())
        found.setdefault(record["variant"], []).append(record)
    for records in found.values():
        records.sort(key=lambda r: r["seed"])
    return found


METRICS = (  # (column, key path in result.json, scale)
    ("linear probe top-1 %", ("probe", "final_top1"), 100.0),
    ("finetune top-1 %", ("finetune", "final_top1"), 100.0),
    ("channel distance before GRN (mean over blocks)", ("collapse", "mlp", "mean"), 1.0),
    ("channel distance after GRN", ("collapse", "grn", "mean"), 1.0),
    ("pretrain loss (last 20 % of steps)", ("pretrain", "final_loss"), 1.0),
)


def _get(record: dict, path: tuple[str, ...]):
    for key in path:
        if record is None or key not in record:
            return None
        record = record[key]
    return record


def mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def claim_table(claim: Claim, results: dict[str, list[dict]]) -> str:
    """A markdown table: one row per variant, mean ± std over its seeds, and the per-seed values."""
    lines = ["| variant | seeds | " + " | ".join(m[0] for m in METRICS) + " | probe per seed | probe − baseline, "
             "paired by seed |", "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    # A seed fixes the probe's training subset for every variant, so the paired difference to the baseline
    # of the same seed removes that share of the spread.
    base = {r["seed"]: 100 * r["probe"]["final_top1"] for r in results.get(BASELINE.name, [])}
    for name in claim.rows:
        records = results.get(name, [])
        cells = []
        for _, path, scale in METRICS:
            values = [scale * v for v in (_get(r, path) for r in records) if v is not None]
            cells.append(mean_std(values, 2 if scale == 100.0 else 3))
        per_seed = ", ".join(f"s{r['seed']}: {100 * r['probe']['final_top1']:.2f}" for r in records)
        diffs = [100 * r["probe"]["final_top1"] - base[r["seed"]] for r in records if r["seed"] in base]
        paired = "–" if name == BASELINE.name or not diffs else (
            f"{mean_std(diffs, 2)} ({', '.join(f'{d:+.2f}' for d in diffs)})")
        lines.append(f"| {name} | {len(records)} | " + " | ".join(cells) + f" | {per_seed or '–'} | {paired} |")
    return "\n".join(lines)
