"""scripts/gpu_check.sh in its CPU smoke mode: the same steps as on a GPU (environment check,
pytest -m cuda, the benchmark, JSON + markdown, summary line last) at toy size, so the script
cannot rot between GPU runs."""
import json
import subprocess

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--cpu-smoke"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: OK | CPU smoke | cuda tests 0 passed/0 failed/") and str(out) in last
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["summary"] == last and (out / "summary.txt").read_text().strip() == last
    assert report["cuda_tests"]["failed"] == 0 and report["cuda_tests"]["skipped"] >= 10  # skipped, not absent
    rows = report["benchmarks"][0]["rows"]
    assert {(r["backend"], r["mask_ratio"]) for r in rows} >= {("timm-dense", 0.0), ("packed", 0.6), ("dense", 0.75)}
    assert all(r["train_step"]["images_per_s"] > 0 for r in rows)
    assert "spconv" in report["benchmarks"][0]["skipped"]  # no bf16 in spconv: listed, not silently dropped
    md = (out / "gpu_check.md").read_text()
    assert "| packed | 0.60 |" in md and md.strip().endswith(last)
