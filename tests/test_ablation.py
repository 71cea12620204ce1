"""The ablation harness (tools/ablate.py) on a tiny budget: result files with their full config,
skipping of finished work, refusal of a mixed budget, and the summary tables' arithmetic."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from mimsparse.evaluate.ablation import CLAIMS, VARIANTS, claim_table, floor_cleared, run_order
from tests.conftest import ROOT

TINY = ["--data", "lfw-subset", "--img-size", "64", "--steps", "2", "--batch-size", "8", "--probe-train", "40",
        "--probe-epochs", "2", "--eval-limit", "20", "--finetune-fraction", "0.1", "--finetune-epochs", "1",
        "--finetune-batch", "8", "--collapse-images", "4", "--seeds", "0"]


def _ablate(out, *args):
    cmd = [sys.executable, str(ROOT / "tools" / "ablate.py"), "--out", str(out), *TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_tiny_ablation_runs_records_its_config_and_skips_finished_work(tmp_path):
    out = tmp_path / "abl"
    variants = ["--variants", "sparse-r0.6-grn", "leaky-r0.6-grn", "random-init"]
    r = _ablate(out, *variants)
    assert r.returncode == 0, r.stderr[-2000:]
    sparse, leaky, rand = (json.loads((out / v / "s0" / "result.json").read_text())
                           for v in ("sparse-r0.6-grn", "leaky-r0.6-grn", "random-init"))
    # Each result holds the full pretraining config (the variant's own setting included) and the budget.
    assert sparse["pretrain_config"]["model"]["encoder_input"] == "sparse"
    assert leaky["pretrain_config"]["model"]["encoder_input"] == "masked_image_dense"
    assert sparse["pretrain_config"]["train"]["max_steps"] == 2 and sparse["pretrain_config"]["data"]["img_size"] == 64
    assert rand["pretrain_config"] is None and rand["budget"]["steps"] == 2
    for rec in (sparse, rand):  # what each run cost on the shared machine
        m = rec["machine"]
        assert 0 < m["cpu_s_this_call"] and len(m["loadavg_start"]) == 3 and m["start_utc"] <= m["end_utc"]
    for rec, v in ((sparse, "sparse-r0.6-grn"), (rand, "random-init")):
        probe = json.loads((out / v / "s0" / "probe" / "results.json").read_text())
        assert rec["probe"]["final_top1"] == probe["final_top1"]
        assert 0.0 <= rec["finetune"]["final_top1"] <= 1.0
        assert len(rec["collapse"]["grn"]["per_block"]) == 12  # atto: 2 + 2 + 6 + 2 blocks
    summary = (out / "summary.md").read_text()
    assert "| leaky-r0.6-grn | 1 |" in summary and "| sparse-r0.6-nogrn | 0 |" in summary
    # published into the docs: the result files, and the same tables rebuilt from those copies
    docs = tmp_path / "docs"
    subprocess.run(["bash", str(ROOT / "scripts" / "ablation_publish.sh"), str(out), str(docs)], check=True,
                   cwd=ROOT, env=dict(os.environ, PY=sys.executable), capture_output=True)
    assert sorted(p.name for p in docs.iterdir()) == ["budget.json", "collapse.png", "leaky-r0.6-grn-s0.json",
                                                      "random-init-s0.json", "sparse-r0.6-grn-s0.json", "summary.md"]
    assert (docs / "summary.md").read_text() == summary

    # A second call skips the finished runs; a lost result.json is rebuilt without pretraining again.
    ckpt = next((out / "sparse-r0.6-grn" / "s0" / "pretrain").glob("checkpoint-*.pth"))
    before = ckpt.stat().st_mtime_ns
    (out / "sparse-r0.6-grn" / "s0" / "result.json").unlink()
    r = _ablate(out, *variants)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done, skipped") == 2 and ckpt.stat().st_mtime_ns == before
    assert json.loads((out / "sparse-r0.6-grn" / "s0" / "result.json").read_text())["probe"] == sparse["probe"]

    # --require-floor: the other variants only once the baseline clears random init by the margin.
    r = _ablate(out, *variants, "--require-floor", "1000")
    assert r.returncode == 3 and "does not clear 1000 points" in r.stdout and "leaky-r0.6-grn seed" not in r.stdout

    # Runs of another budget do not mix into the same tables.
    r = _ablate(out, "--variants", "random-init", "--probe-epochs", "3")
    assert r.returncode == 2 and f"error: output folder '{out}' holds the files of another run (5: budget.json, " \
        f"summary.md, " in r.stderr


def test_claim_tables_give_mean_and_sample_std_over_seeds():
    def record(seed, probe, ft):
        return {"variant": "sparse-r0.6-grn", "seed": seed, "probe": {"final_top1": probe},
                "finetune": {"final_top1": ft}, "collapse": {"grn": {"mean": 0.4 + seed / 10}},
                "pretrain": {"final_loss": 0.5}}
    results = {"sparse-r0.6-grn": [record(0, 0.80, 0.70), record(1, 0.83, 0.74)]}
    row = claim_table(CLAIMS[0], results).splitlines()[2]
    assert row.startswith("| sparse-r0.6-grn | 2 | ")
    assert f"{statistics.mean([80, 83]):.2f} ± {statistics.stdev([80, 83]):.2f}" in row  # 81.50 ± 2.12
    assert "72.00 ± 2.83" in row and "0.450 ± 0.071" in row and "| – |" in row and "s0: 80.00, s1: 83.00" in row
    assert "| leaky-r0.6-grn | 0 | – |" in claim_table(CLAIMS[0], results)
    # The paired column: variant minus the baseline of the same seed.
    results["leaky-r0.6-grn"] = [dict(record(0, 0.78, 0.7), variant="leaky-r0.6-grn"),
                                 dict(record(1, 0.84, 0.7), variant="leaky-r0.6-grn")]
    leaky = claim_table(CLAIMS[0], results).splitlines()[3]
    assert leaky.endswith(f"| {statistics.mean([-2, 1]):.2f} ± {statistics.stdev([-2, 1]):.2f} (-2.00, +1.00) |")
    # Every claim's rows are variants the harness runs, and the baseline serves all three tables.
    assert all(name in VARIANTS for c in CLAIMS for name in c.rows)
    assert all("sparse-r0.6-grn" in c.rows for c in CLAIMS)


def test_floor_runs_first_then_the_other_variants_seed_major():
    order = run_order(["sparse-r0.6-grn", "leaky-r0.6-grn", "sparse-r0.4-grn", "random-init"], [0, 1, 2])
    assert order[:6] == [("random-init", 0), ("sparse-r0.6-grn", 0), ("random-init", 1), ("sparse-r0.6-grn", 1),
                         ("random-init", 2), ("sparse-r0.6-grn", 2)]
    assert order[6:] == [("leaky-r0.6-grn", 0), ("sparse-r0.4-grn", 0), ("leaky-r0.6-grn", 1), ("sparse-r0.4-grn", 1),
                         ("leaky-r0.6-grn", 2), ("sparse-r0.4-grn", 2)]
    assert run_order(["leaky-r0.6-grn"], [0, 1]) == [("leaky-r0.6-grn", 0), ("leaky-r0.6-grn", 1)]


@pytest.mark.slow
def test_a_killed_job_resumes_from_its_last_periodic_checkpoint(tmp_path):
    """SIGKILL mid-pretraining (no chance to clean up), then the same command: the pretraining goes on
    from the last checkpoint written within the epoch (--checkpoint-steps) and logs every step once."""
    out = tmp_path / "abl"
    args = ["--variants", "sparse-r0.6-grn", "--steps", "6", "--checkpoint-steps", "2"]
    cmd = [sys.executable, str(ROOT / "tools" / "ablate.py"), "--out", str(out), *TINY, *args]
    pre = out / "sparse-r0.6-grn" / "s0" / "pretrain"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (pre / "checkpoint-0000002.pth").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (pre / "checkpoint-0000002.pth").is_file() and not (pre / "checkpoint-0000006.pth").is_file()
    assert not (out / "sparse-r0.6-grn" / "s0" / "result.json").is_file()

    r = _ablate(out, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resum" in r.stdout.lower()
    rec = json.loads((out / "sparse-r0.6-grn" / "s0" / "result.json").read_text())
    assert rec["pretrain_config"]["train"]["max_steps"] == 6 and rec["pretrain"]["checkpoint"].endswith("0000006.pth")
    steps = [json.loads(line)["step"] for line in (pre / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_floor_is_cleared_only_by_the_margin_with_seeds_apart():
    def results(base, rand):
        return {"sparse-r0.6-grn": [{"seed": s, "probe": {"final_top1": v / 100}} for s, v in enumerate(base)],
                "random-init": [{"seed": s, "probe": {"final_top1": v / 100}} for s, v in enumerate(rand)]}
    ok, text = floor_cleared(results([80, 78, 79], [72, 73, 74]), 5)
    assert ok and "+6.00 points (s0: +8.00, s1: +5.00, s2: +5.00)" in text and "do not overlap" in text
    assert not floor_cleared(results([80, 78, 79], [72, 73, 74]), 6.5)[0]          # mean +6 < 6.5
    ok, text = floor_cleared(results([85, 75], [70, 76]), 5)                      # +7 on average, but 75 < 76
    assert not ok and "overlap;" in text
    assert not floor_cleared({"sparse-r0.6-grn": results([90], [1])["sparse-r0.6-grn"]}, 5)[0]


def test_verdicts_use_a_paired_t_interval_and_the_papers_direction():
    """The interval is Student's t over the paired differences (checked against scipy by hand: mean
    -2, sd 1, n 3 -> t(0.975, 2) = 4.303); a claim is confirmed only when every comparison's interval
    lies on the papers' side, contradicted when one lies on the other side."""
    from mimsparse.evaluate.ablation_report import claim_verdict, paired_ci, verdicts_markdown

    mean, lo, hi = paired_ci([-1.0, -2.0, -3.0])
    assert mean == -2.0 and abs(hi - (-2.0 + 4.302653 / 3 ** 0.5)) < 1e-5 and abs(lo + hi + 4.0) < 1e-9
    assert paired_ci([1.0]) is None

    def record(variant, seed, probe, ft=0.5, mlp=0.3):
        return {"variant": variant, "seed": seed, "probe": {"final_top1": probe}, "finetune": {"final_top1": ft},
                "collapse": {"mlp": {"mean": mlp}}}
    base = [record("sparse-r0.6-grn", s, 0.80 + s / 100, 0.70) for s in range(3)]
    results = {"sparse-r0.6-grn": base, "random-init": [record("random-init", s, 0.70) for s in range(3)]}
    sentence, lines = claim_verdict(CLAIMS[0], results)
    assert "no verdict yet" in sentence and lines[0].endswith("– — not run")
    results["leaky-r0.6-grn"] = [record("leaky-r0.6-grn", 0, 0.79)]  # one seed: a difference, no interval
    sentence, lines = claim_verdict(CLAIMS[0], results)
    assert "no verdict yet" in sentence and lines[0].endswith("-1.00 points (1 seed, no interval) — no verdict yet")
    # leaky 2-4 points lower on the probe for every seed, finetune equal to the baseline: unresolved
    results["leaky-r0.6-grn"] = [record("leaky-r0.6-grn", s, 0.80 + s / 100 - (2 + s) / 100, 0.70) for s in range(3)]
    sentence, lines = claim_verdict(CLAIMS[0], results)
    assert lines[0].startswith("leaky dense − sparse, linear probe: -3.00 points (95 % CI -5.48 .. -0.52, 3 seeds)")
    assert lines[0].endswith("confirmed") and "unresolved at this budget" in sentence
    # ... and lower on the finetune too: confirmed; higher on the finetune: contradicted
    for s, r in enumerate(results["leaky-r0.6-grn"]):
        r["finetune"]["final_top1"] = 0.70 - (2 + s) / 100
    assert "confirmed at this budget" in claim_verdict(CLAIMS[0], results)[0]
    for s, r in enumerate(results["leaky-r0.6-grn"]):
        r["finetune"]["final_top1"] = 0.70 + (2 + s) / 100
    assert "contradicted at this budget" in claim_verdict(CLAIMS[0], results)[0]
    # GRN: the collapse comparison reads the MLP-expansion distance, lower without GRN = the papers' side
    results["sparse-r0.6-nogrn"] = [record("sparse-r0.6-nogrn", s, 0.70, mlp=0.1 + s / 100) for s in range(3)]
    sentence, lines = claim_verdict(CLAIMS[2], results)
    assert "confirmed at this budget" in sentence and "-0.190 (95 % CI" in lines[1]
    assert verdicts_markdown(results).startswith("Baseline − random init, linear probe, paired by seed: +11.00 "
                                                 "points (95 % CI +8.52 .. +13.48, 3 seeds).")


def test_the_collapse_figure_averages_each_block_over_seeds(tmp_path):
    """Fig. 3 from the result files: per block, the mean over seeds and their range; the stage of each
    block from the model's depths (atto: 2, 2, 6, 2); variants without results are left out."""
    from mimsparse.evaluate.ablation_report import collapse_curves, collapse_figure

    def record(variant, seed, mlp, grn):
        return {"variant": variant, "seed": seed, "pretrain_config": {"model": {"name": "convnextv2_atto"}},
                "collapse": {"mlp": {"per_block": mlp}, "grn": {"per_block": grn}}}
    mlp = [[0.1 * (k % 5) + s / 100 for k in range(12)] for s in range(3)]
    results = {"sparse-r0.6-grn": [record("sparse-r0.6-grn", s, mlp[s], [0.4] * 12) for s in range(3)],
               "random-init": [record("random-init", 0, [0.49] * 12, [0.49] * 12)]}
    curves = collapse_curves(results)
    assert list(curves) == ["FCMAE, GRN (before GRN) (3 seeds)", "FCMAE, GRN (after GRN) (3 seeds)",
                            "random init (1 seed)"]
    rows = curves["FCMAE, GRN (before GRN) (3 seeds)"]
    assert [(r["stage"], r["block"]) for r in rows[:5]] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert rows[-1]["stage"] == 3 and rows[-1]["block"] == 1
    assert rows[3]["distance"] == pytest.approx(0.31)
    assert (rows[3]["low"], rows[3]["high"]) == pytest.approx((0.3, 0.32))
    assert collapse_figure(tmp_path) is None  # no result files there
    for variant, runs in results.items():
        for r in runs:
            (tmp_path / variant / f"s{r['seed']}").mkdir(parents=True)
            (tmp_path / variant / f"s{r['seed']}" / "result.json").write_text(json.dumps(r))
    path = collapse_figure(tmp_path)
    assert path == tmp_path / "collapse.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TINY_BUDGET = " ".join(a for a in TINY[:TINY.index("--steps")] + TINY[TINY.index("--steps") + 2:TINY.index("--seeds")])


@pytest.mark.slow
def test_budget_search_shares_the_runs_between_workers_and_stops_below_the_floor(tmp_path):
    """scripts/ablation_budget_search.sh with two workers on a tiny budget: every floor run (random init
    and the baseline, two seeds) runs once, the two workers at the same time; a margin no tiny run
    reaches stops the budget with exit status 3 before the other variants; a second search on the same
    folder is refused while the first runs."""
    out = tmp_path / "search"
    env = dict(os.environ, OUT=str(out), EPOCHS="1", STEPS_PER_EPOCH="2", JOBS="2", SEEDS="0 1", FLOOR="1000",
               PY=sys.executable, BUDGET=TINY_BUDGET)
    script = str(ROOT / "scripts" / "ablation_budget_search.sh")
    first = subprocess.Popen(["bash", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 120
    while not (out / "e1" / ".claims").is_dir() and time.time() < deadline:
        time.sleep(0.5)
    second = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "another budget search is running" in second.stderr
    text, _ = first.communicate(timeout=900)
    assert first.returncode == 3, text[-3000:]
    assert (out / ".search.sh").is_file() and (out / "code" / "COMMIT").is_file()  # runs from private copies
    records = [json.loads((out / "e1" / v / f"s{s}" / "result.json").read_text())
               for s in (0, 1) for v in ("random-init", "sparse-r0.6-grn")]
    for r in records:
        assert text.count(f"[ablate] {r['variant']} seed {r['seed']}: start") == 1  # no run twice
    spans = [(r["machine"]["start_utc"], r["machine"]["end_utc"]) for r in records]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])  # two at once
    assert "does not clear 1000 points" in text and "leaky-r0.6-grn seed" not in text
    assert not list((out / "e1").glob("leaky-r0.6-grn/s*/result.json"))
    assert "### Verdicts" in (out / "e1" / "summary.md").read_text()
    assert "[search] no budget in (1) cleared the margin" in text


@pytest.mark.slow
def test_a_run_held_by_another_process_is_skipped_or_waited_for(tmp_path, capsys):
    """Two ablation processes on one folder: a run another process holds (a real second process holding
    its folder lock) is skipped, or, with wait (the floor's runs), waited for and then run here once
    that process has let go without finishing it."""
    import importlib.util
    from dataclasses import fields

    from mimsparse.evaluate.ablation import Budget

    spec = importlib.util.spec_from_file_location("ablate_tool", ROOT / "tools" / "ablate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "abl"
    args = tool.get_args_parser().parse_args(["--out", str(out), *TINY])
    budget = Budget(**{f.name: getattr(args, f.name) for f in fields(Budget)})
    run_dir = out / "random-init" / "s0"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mimsparse.train.run_folder import held\n"
                               f"with held({str(run_dir)!r}, 'other'):\n    print('held', flush=True)\n    time.sleep(6)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    tool.run_held(out, VARIANTS["random-init"], 0, budget, args, wait=False)
    assert "random-init seed 0: another process is running it, skipped" in capsys.readouterr().out
    assert not (run_dir / "result.json").exists()
    t0 = time.time()
    tool.run_held(out, VARIANTS["random-init"], 0, budget, args, wait=True, poll_s=0.5)
    assert holder.wait(timeout=30) == 0 and time.time() - t0 >= 3  # it waited for the holder to let go
    text = capsys.readouterr().out
    assert "another process is running it, waiting" in text and "random-init seed 0: probe" in text
    assert json.loads((run_dir / "result.json").read_text())["variant"] == "random-init"
