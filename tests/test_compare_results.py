"""tools/compare_results.py: mean ± sample std of final top-1 per group of run folders."""
import json

from tests.conftest import run_tool


def _run(folder, final, best):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"final_top1": final, "best_top1": best}))


def test_table_holds_mean_and_std_per_group(tmp_path):
    _run(tmp_path / "a-s0", 0.80, 0.81)
    _run(tmp_path / "a-s1", 0.84, 0.85)
    _run(tmp_path / "b-s0", 0.50, 0.70)
    out = tmp_path / "table.md"
    proc = run_tool("compare_results.py", f"A={tmp_path}/a-s*", f"B={tmp_path}/b-s*", "-o", str(out))
    lines = out.read_text().splitlines()
    assert proc.stdout.strip() == out.read_text().strip()
    # mean 82, sample std of (80, 84) = 2.83; best-epoch mean 83
    assert lines[2] == "| A | 2 | 82.00 ± 2.83 % | 80.00, 84.00 | 83.00 % |"
    assert lines[3] == "| B | 1 | 50.00 ± 0.00 % | 50.00 | 70.00 % |"
    proc = run_tool("compare_results.py", f"C={tmp_path}/none-*", check=False)
    assert proc.returncode == 2 and "no results.json" in proc.stderr
