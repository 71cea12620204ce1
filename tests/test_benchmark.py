"""Benchmark tool: JSON schema, ratios computed from the measured rows, skipped backends listed."""
import json
import statistics

import pytest

from mimsparse.benchmark import MEASURES, TIMM_DENSE, markdown_table, run_benchmark
from tests.conftest import run_tool


def test_ratios_are_computed_from_measured_rows():
    result = run_benchmark("convnextv2_atto", ["dense"], [0.0, 0.5], batch=2, img=64,
                           repeats=2, warmup=0, log=lambda *_: None)
    assert set(result) == {"settings", "machine", "rows", "skipped"}
    rows = {(r["backend"], r["mask_ratio"]): r for r in result["rows"]}
    assert set(rows) == {(TIMM_DENSE, 0.0), ("dense", 0.0), ("dense", 0.5)}
    ref = rows[(TIMM_DENSE, 0.0)]
    for row in rows.values():
        assert row["saved_activation_mb"] > 0
        for m in MEASURES:
            samples = row["samples_ms"][m]
            assert len(samples) == 2 and all(s > 0 for s in samples)
            stats = row[m]
            assert stats["median_ms"] == statistics.median(samples)
            ref_med = statistics.median(ref["samples_ms"][m])
            assert stats["ratio_to_dense"] == pytest.approx(stats["median_ms"] / ref_med)
            assert stats["ratio_to_ideal"] == pytest.approx(stats["median_ms"] / (ref_med * (1 - row["mask_ratio"])))
            assert stats["images_per_s"] == pytest.approx(2 / (stats["median_ms"] / 1e3))
    result["skipped"]["spconv"] = "spconv is not installed"
    assert "| spconv | skipped: spconv is not installed |" in markdown_table(result)


@pytest.mark.slow
def test_cli_writes_json_table_and_plot(tmp_path):
    run_tool("benchmark.py", "--backends", "dense", "--mask-ratios", "0.6", "--batch", "1", "--img", "64",
             "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path), "--name", "t")
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["command"].startswith("tools/benchmark.py") and data["date"]
    assert (tmp_path / "t.md").read_text().count("| dense |") == 1
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_resnet_rows_run_the_sparse_resnet_and_timm_resnet():
    result = run_benchmark("resnet18", ["packed"], [0.5], batch=1, img=64, repeats=1, warmup=0, log=lambda *_: None)
    assert {(r["backend"], r["mask_ratio"]) for r in result["rows"]} == {(TIMM_DENSE, 0.0), ("packed", 0.5)}
    assert not result["skipped"]


def test_noisy_rows_are_named_from_the_min_max_spread():
    from mimsparse.benchmark import noisy_rows

    def row(backend, spread_ms):
        return {"backend": backend, "mask_ratio": 0.6,
                **{m: {"median_ms": 100.0, "min_ms": 95.0, "max_ms": 95.0 + spread_ms} for m in MEASURES}}

    result = {"rows": [row("packed", 10.0), row("dense", 40.0)]}
    lines = noisy_rows(result)
    assert len(lines) == len(MEASURES) and all(line.startswith("dense mask 0.60") for line in lines)
    assert "40% spread" in lines[0] and noisy_rows(result, threshold=0.5) == []
    # a measure left out with --measures is None in every row: not a spread, not a crash
    for r in result["rows"]:
        r["enc_fwd"] = None
    assert len(noisy_rows(result)) == len(MEASURES) - 1


@pytest.mark.slow
def test_cli_writes_a_run_folder_and_never_over_existing_results(tmp_path):
    args = ["--backends", "dense", "--mask-ratios", "0.6", "--batch-size", "1", "--img-size", "64x96",
            "--repeats", "2", "--warmup", "0", "--name", "t"]
    proc = run_tool("benchmark.py", *args, "--output-dir", str(tmp_path / "committed"))
    data = json.loads((tmp_path / "committed" / "t.json").read_text())
    assert data["settings"]["img"] == [64, 96] and "noisy_rows" in data
    before = (tmp_path / "committed" / "t.json").read_bytes()
    proc = run_tool("benchmark.py", *args, "--output-dir", str(tmp_path / "committed"), check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr and "--overwrite" in proc.stderr
    assert (tmp_path / "committed" / "t.json").read_bytes() == before
    # by default: a new folder under runs/benchmark/ (here in a scratch copy of the working directory)
    import subprocess
    import sys

    from tests.conftest import ROOT
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), *args], cwd=tmp_path,
                         capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    (folder,) = (tmp_path / "runs" / "benchmark").iterdir()
    assert folder.name.endswith("-t") and (folder / "t.md").is_file()


def test_data_benchmark_counts_the_images_it_times(photo_dir, monkeypatch):
    """Folder and shard rows for each worker count; the rate is images after the first batch over the
    time measured, per worker divided by the workers (no timing asserted)."""
    from mimsparse import data_benchmark

    timed = []
    original = data_benchmark.time_loader

    def spy(loader, batches):
        seconds, images = original(loader, batches)
        timed.append((seconds, images))
        return seconds, images

    monkeypatch.setattr(data_benchmark, "time_loader", spy)
    result = data_benchmark.run_data_benchmark(photo_dir, (32, 48), workers=(0, 1), batch_size=2, batches=4,
                                               repeats=2, shard_size=2)
    assert [(r["source"], r["workers"]) for r in result["rows"]] == [("folder", 0), ("folder", 1), ("shards", 0),
                                                                    ("shards", 1)]
    assert all(images == 3 * 2 for _, images in timed) and len(timed) == 8  # 3 timed batches of 2
    for row, pair in zip(result["rows"], zip(timed[::2], timed[1::2])):
        rates = [images / seconds for seconds, images in pair]
        assert row["img_per_s"] == pytest.approx(statistics.median(rates))
        assert row["img_per_s_per_worker"] == pytest.approx(row["img_per_s"] / max(1, row["workers"]))
    assert data_benchmark.markdown_table(result).count("\n") == 5


class _Clock:
    """time.monotonic stand-in that advances one second per call: deadlines become deterministic."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now

    perf_counter = staticmethod(__import__("time").perf_counter)


def test_deadline_skips_rows_not_started_and_stops_repeats(monkeypatch):
    """A run on a machine lent by the minute: rows not started by the deadline are listed as skipped
    (never silently dropped), the rows that started keep their samples, the repeats stop."""
    import mimsparse.benchmark as bench

    monkeypatch.setattr(bench, "time", _Clock())
    # prepare order: reference (no clock read), dense 0.6 (1), packed 0.6 (2), dense 0.75 (3), packed 0.75 (4)
    result = run_benchmark("convnextv2_atto", ["dense", "packed"], [0.6, 0.75], batch=1, img=64, repeats=3,
                           warmup=0, measures=("train_step",), log=lambda *_: None, deadline=2.5)
    assert [(r["backend"], r["mask_ratio"]) for r in result["rows"]] == [(TIMM_DENSE, 0.0), ("dense", 0.6),
                                                                        ("packed", 0.6)]
    assert result["skipped"] == {"dense r=0.75": "time budget: not started before the deadline",
                                 "packed r=0.75": "time budget: not started before the deadline"}
    assert result["settings"]["repeats"] == 1  # the repeat loop read the clock (5 > 2.5) and stopped
    assert all(len(r["samples_ms"]["train_step"]) == 1 for r in result["rows"])
    assert "| packed r=0.75 | skipped: time budget" in markdown_table(result)


def test_prepare_order_puts_the_first_ratio_and_compiled_rows_first():
    from mimsparse.benchmark import Case, _prepare_order

    cases = [Case(TIMM_DENSE, 0.0), Case(TIMM_DENSE, 0.0, compiled=True)]
    for r in (0.6, 0.75):
        cases += [Case("dense", r, compiled=True), Case("packed", r), Case("packed", r, compiled=True),
                  Case("spconv", r)]
    order = [(c.backend, c.mask_ratio, c.compiled) for c in _prepare_order(cases, (0.6, 0.75))]
    assert order == [(TIMM_DENSE, 0.0, False),
                     ("dense", 0.6, True), ("packed", 0.6, True), ("packed", 0.6, False), ("spconv", 0.6, False),
                     (TIMM_DENSE, 0.0, True),
                     ("dense", 0.75, True), ("packed", 0.75, True), ("packed", 0.75, False), ("spconv", 0.75, False)]


def test_compiled_rows_without_a_compiled_reference_have_no_ratio():
    from mimsparse.benchmark import Case, summarize

    ref, row = Case(TIMM_DENSE, 0.0), Case("packed", 0.6, compiled=True)
    for c, ms in ((ref, 10.0), (row, 4.0)):
        c.samples_ms = {m: [ms] for m in MEASURES}
    out = summarize([ref, row], {}, {"batch": 2})["rows"][1]
    # an eager reference would give 0.4: compiled is never divided by eager
    assert out["train_step"]["ratio_to_dense"] is None and out["train_step"]["ratio_to_ideal"] is None
    assert out["train_step"]["images_per_s"] == pytest.approx(500.0)
