"""scripts/gpu_check.sh in its CPU smoke mode: the same steps as on a GPU (environment check,
pytest -m cuda, the benchmark, JSON + markdown, summary line last) at toy size, so the script
cannot rot between GPU runs."""
import json
import os
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
    assert "| packed | 0.50 (asked 0.60) |" in md and md.strip().endswith(last)  # 64²: 2 of 4 patches masked
    # the per-shape conv A/B ran on the device and names every ResNet-50 shape's fastest implementation
    conv_ab = (out / "conv_ab.txt").read_text()
    assert conv_ab.count("; fastest ") == 11 and "3x3/1 56 (stage 1)" in conv_ab and conv_ab.strip() in md
    assert "1x1/2 14->7 (shortcut)" in conv_ab  # the strided 1x1 shortcuts too


def _write_wheel(path, module: str, value: int):
    """A minimal pure-Python wheel (what scripts/gpu_wheels.sh would have downloaded)."""
    import zipfile

    dist = path.name.split("-")[0]
    info = f"{dist}-0.1.dist-info"
    files = {f"{module}/__init__.py": f"VALUE = {value}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


@pytest.mark.slow
def test_gpu_check_setup_with_the_machine_python_and_split_wheels(tmp_path):
    """The GPU machine's path: no project venv, the machine's interpreter used as it is, a wheel carried
    in two pieces in two folders joined and installed into the site folder, mimsparse installed there
    from the checkout. A second run installs nothing again, and names and leaves out what it cannot use
    (going on rather than stopping at pip's refusal): pieces that do not join into a whole wheel, and a
    wheel for another Python or platform (the GPU machine's cp312 on a cp311 machine, say)."""
    import sys

    wheel = tmp_path / "mimsparse_probe-0.1-py3-none-any.whl"
    _write_wheel(wheel, "mimsparse_probe", 42)
    data = wheel.read_bytes()
    for d in "abc":
        (tmp_path / d).mkdir()
    (tmp_path / "a" / f"{wheel.name}.part-00").write_bytes(data[:len(data) // 2])
    (tmp_path / "b" / f"{wheel.name}.part-01").write_bytes(data[len(data) // 2:])
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MIMSPARSE_NO_VENV="1", PYTHON=sys.executable, MIMSPARSE_GPU_SITE=str(site),
               MIMSPARSE_WHEELS=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--prepare-only"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installing from" in first.stdout and "mimsparse_probe-0.1-py3-none-any.whl" in first.stdout
    assert f"mimsparse from {site / 'mimsparse' / 'mimsparse' / 'backends'}" in first.stdout
    assert first.stdout.strip().splitlines()[-1].startswith("gpu_check.sh: prepared")
    probe = subprocess.run([sys.executable, "-c", "import mimsparse_probe, mimsparse.backends as b; "
                            "print(mimsparse_probe.VALUE, b.__file__)"], capture_output=True, text=True,
                           cwd="/", env={**env, "PYTHONPATH": f"{site / 'mimsparse'}:{site / 'deps'}"})
    value, backends_file = probe.stdout.split()
    assert value == "42" and backends_file.startswith(str(site / "mimsparse"))

    broken = tmp_path / "mimsparse_broken-0.1-py3-none-any.whl"
    _write_wheel(broken, "mimsparse_broken", 1)
    (tmp_path / "c" / f"{broken.name}.part-00").write_bytes(broken.read_bytes()[:100])  # part-01 never came
    _write_wheel(tmp_path / "c" / "mimsparse_alien-0.1-cp27-cp27mu-linux_armv7l.whl", "mimsparse_alien", 3)
    env["MIMSPARSE_WHEELS"] += f":{tmp_path / 'c'}"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert again.returncode == 0 and "installing from" not in again.stdout, again.stdout + again.stderr
    assert f"{broken.name}: joined parts are not a whole wheel" in again.stderr
    assert "mimsparse_alien-0.1-cp27-cp27mu-linux_armv7l.whl is not for this Python/platform: skipped" in again.stderr
    assert again.stdout.strip().splitlines()[-1].startswith("gpu_check.sh: prepared")
