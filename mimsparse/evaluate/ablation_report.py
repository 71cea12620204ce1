"""The ablation report (``summary.md``): the claim tables and what they say about the papers' claims --
paired-by-seed differences to the baseline with a 95 % confidence interval (Student's t over the
seeds), and one sentence per claim (confirmed, contradicted or unresolved at the budget run) next to
the direction the papers report.

A seed fixes the probe's and finetune's training subsets and the initialisation for every variant, so the
difference to the baseline of the same seed is the quantity to average; its interval says whether the
seeds agree on the sign."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from mimsparse.evaluate.ablation import BASELINE, CLAIMS, Claim, claim_table, load_results

LEVEL = 0.95


@dataclass(frozen=True)
class Comparison:
    variant: str
    metric: tuple[str, ...]   # key path in result.json
    label: str                # what is compared, for the sentence
    scale: float              # 100 for accuracies (points), 1 for distances
    expected: int             # the papers' sign of (variant - baseline): -1 = the baseline is better / larger


PROBE, FINETUNE, COLLAPSE = ("probe", "final_top1"), ("finetune", "final_top1"), ("collapse", "mlp", "mean")
# Per claim (CLAIMS order): the comparisons that decide it, each the variant minus the baseline.
COMPARISONS: dict[str, tuple[Comparison, ...]] = {
    CLAIMS[0].title: (Comparison("leaky-r0.6-grn", PROBE, "leaky dense − sparse, linear probe", 100.0, -1),
                      Comparison("leaky-r0.6-grn", FINETUNE, "leaky dense − sparse, finetune", 100.0, -1)),
    CLAIMS[1].title: tuple(Comparison(f"sparse-r{r}-grn", PROBE, f"ratio {r} − ratio 0.6, linear probe", 100.0, -1)
                           for r in ("0.4", "0.75", "0.9")),
    CLAIMS[2].title: (Comparison("sparse-r0.6-nogrn", PROBE, "no GRN − GRN, linear probe", 100.0, -1),
                      Comparison("sparse-r0.6-nogrn", COLLAPSE, "no GRN − GRN, channel cosine distance at the "
                                 "MLP expansion (Fig. 3; lower = more collapsed)", 1.0, -1)),
}


def paired_ci(diffs: list[float], level: float = LEVEL) -> tuple[float, float, float] | None:
    """(mean, low, high): the mean of the paired differences and its two-sided t interval; None below 2."""
    if len(diffs) < 2:
        return None
    from scipy import stats

    mean = statistics.mean(diffs)
    half = stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def _value(record: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(record, dict) or record.get(key) is None:
            return None
        record = record[key]
    return record


def paired_diffs(results: dict[str, list[dict]], variant: str, path: tuple[str, ...], scale: float,
                 baseline: str = BASELINE.name) -> list[float]:
    """variant - baseline of the same seed, for every seed both have finished."""
    base = {r["seed"]: _value(r, path) for r in results.get(baseline, [])}
    return [scale * (v - base[r["seed"]]) for r in results.get(variant, [])
            if (v := _value(r, path)) is not None and base.get(r["seed"]) is not None]


def describe(diffs: list[float], digits: int, unit: str = "") -> str:
    ci = paired_ci(diffs)
    if ci is None:
        return "–" if not diffs else f"{diffs[0]:+.{digits}f}{unit} (1 seed, no interval)"
    mean, lo, hi = ci
    return f"{mean:+.{digits}f}{unit} (95 % CI {lo:+.{digits}f} .. {hi:+.{digits}f}, {len(diffs)} seeds)"


def comparison_outcome(diffs: list[float], expected: int) -> str:
    """"confirmed" (the interval lies on the papers' side of 0), "contradicted" (on the other side),
    "unresolved" (it contains 0), "no verdict yet" (one seed: no interval) or "not run"."""
    ci = paired_ci(diffs)
    if ci is None:
        return "no verdict yet" if diffs else "not run"
    _, lo, hi = ci
    if (hi < 0 if expected < 0 else lo > 0):
        return "confirmed"
    if (lo > 0 if expected < 0 else hi < 0):
        return "contradicted"
    return "unresolved"


def claim_verdict(claim: Claim, results: dict[str, list[dict]]) -> tuple[str, list[str]]:
    """(the claim's sentence, one line per comparison). A claim is confirmed when every comparison is,
    contradicted when any is, unresolved otherwise."""
    outcomes, lines = [], []
    for c in COMPARISONS[claim.title]:
        diffs = paired_diffs(results, c.variant, c.metric, c.scale)
        outcome = comparison_outcome(diffs, c.expected)
        outcomes.append(outcome)
        points = c.scale == 100.0
        lines.append(f"{c.label}: {describe(diffs, 2 if points else 3, ' points' if points else '')} — {outcome}")
    if "not run" in outcomes or "no verdict yet" in outcomes:
        verdict = "no verdict yet at this budget (fewer than 2 seeds of a variant)"
    elif "contradicted" in outcomes:
        verdict = "contradicted at this budget"
    elif all(o == "confirmed" for o in outcomes):
        verdict = "confirmed at this budget"
    else:
        verdict = "unresolved at this budget (an interval contains 0)"
    return f"**{claim.title}: {verdict}.** Papers: {claim.paper}.", lines


def verdicts_markdown(results: dict[str, list[dict]]) -> str:
    """The floor (baseline vs random init) and each claim's sentence with its comparisons."""
    floor = paired_diffs(results, BASELINE.name, PROBE, 100.0, baseline="random-init")
    parts = [f"Baseline − random init, linear probe, paired by seed: {describe(floor, 2, ' points')}.", ""]
    for claim in CLAIMS:
        sentence, lines = claim_verdict(claim, results)
        parts += [sentence, ""] + [f"- {line}" for line in lines] + [""]
    return "\n".join(parts)


# Fig. 3 of ConvNeXt V2: per-block channel distance at the MLP expansion (before GRN), with and without GRN
COLLAPSE_CURVES = (("sparse-r0.6-grn", "mlp", "FCMAE, GRN (before GRN)"),
                   ("sparse-r0.6-grn", "grn", "FCMAE, GRN (after GRN)"),
                   ("sparse-r0.6-nogrn", "mlp", "FCMAE, no GRN"),
                   ("random-init", "mlp", "random init"))


def collapse_curves(results: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Label -> one row per block (``layer``, ``stage``, ``block``, ``distance`` = the mean over seeds,
    ``low``/``high`` = their range, ``seeds``) for each curve of :data:`COLLAPSE_CURVES` that has results."""
    from mimsparse.models.convnextv2 import CONVNEXTV2_SPECS

    curves = {}
    for variant, where, label in COLLAPSE_CURVES:
        runs = [r for r in results.get(variant, []) if _value(r, ("collapse", where, "per_block"))]
        if not runs:
            continue
        per_seed = [r["collapse"][where]["per_block"] for r in runs]
        spec = CONVNEXTV2_SPECS.get(_value(runs[0], ("pretrain_config", "model", "name")) or "")
        depths = spec.depths if spec and sum(spec.depths) == len(per_seed[0]) else (len(per_seed[0]),)
        places = [(stage, block) for stage, depth in enumerate(depths) for block in range(depth)]
        curves[f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})"] = [
            {"layer": k, "stage": stage, "block": block, "distance": statistics.mean(values), "low": min(values),
             "high": max(values), "seeds": len(values)}
            for k, ((stage, block), values) in enumerate(zip(places, zip(*per_seed)))]
    return curves


def collapse_figure(out_dir: str | Path) -> Path | None:
    """``<out_dir>/collapse.png``, the Fig. 3 comparison of the finished runs (None when none has one)."""
    from mimsparse.evaluate.collapse import plot

    curves = collapse_curves(load_results(out_dir))
    if not curves:
        return None
    path = Path(out_dir) / "collapse.png"
    plot(curves, path, title="ConvNeXt V2 Fig. 3: channel distance per block (bands: range over seeds)")
    return path


def summary_markdown(out_dir: str | Path) -> str:
    results = load_results(out_dir)
    budgets = {json.dumps(r["budget"], sort_keys=True) for rs in results.values() for r in rs}
    parts = ["### Verdicts", "", verdicts_markdown(results)]
    for claim in CLAIMS:
        parts += [f"### {claim.title}", "", f"Papers: {claim.paper}.", "", claim_table(claim, results), ""]
    if budgets:
        parts += ["Budget: `" + "`, `".join(sorted(budgets)) + "`", ""]
    return "\n".join(parts)
