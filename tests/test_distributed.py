"""Several processes (torchrun, DDP on gloo): the same training as one process with the global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mimsparse.train.checkpoint import load_checkpoint
from mimsparse.config import load_config
from mimsparse.train.data import EpochSampler
from mimsparse.train.build import Pretrainer
from tests.conftest import ROOT, tiny_overrides


@pytest.mark.parametrize("num_items,world,batch", [(12, 2, 2), (13, 2, 2), (11, 3, 1), (25, 2, 3)])
def test_every_rank_gets_the_same_batches_as_one_process(num_items, world, batch):
    single = EpochSampler(num_items, seed=3, epoch=1, batch_size=world * batch).items
    shares = [EpochSampler(num_items, seed=3, epoch=1, rank=r, world_size=world, batch_size=batch).items
              for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) % batch == 0  # same number of full batches
    assert len(single) == world * len(shares[0])
    for k in range(len(shares[0]) // batch):  # global batch k = batch k of one process with world x batch
        together = sorted(item for s in shares for item in s[k * batch:(k + 1) * batch])
        assert together == sorted(single[k * world * batch:(k + 1) * world * batch])
    resumed = EpochSampler(num_items, seed=3, epoch=1, rank=1, world_size=world, batch_size=batch, start=batch).items
    assert resumed == shares[1][batch:]
    with pytest.raises(ValueError, match="rank 2 is not in"):
        EpochSampler(num_items, 0, 0, rank=2, world_size=2)


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tools" / "pretrain.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("backend,batch,accum", [("dense", 2, 1), ("packed", 2, 1),
                                                 ("dense", 1, 2)])
def test_two_processes_match_one_with_the_global_batch(photo_dir, tmp_path, backend, batch, accum):
    """2 processes x batch b (x accum) == 1 process x batch 2b (x accum) after 2 steps: same lr, same
    samples, same masks; gradients averaged by DDP (with no_sync inside an accumulation window)."""
    common = {"data.path": str(photo_dir), "train.max_steps": 2, "train.accum_steps": accum}
    one = Pretrainer(load_config(None, tiny_overrides(tmp_path / "one", **common, **{"train.batch_size": 2 * batch})),
                     backend, show_progress=False)
    history_one = one.run()["history"]

    two_dir = tmp_path / "two"
    proc = _torchrun(2, "--backend", backend, "--no-progress",
                     *tiny_overrides(two_dir, **common, **{"train.batch_size": batch}))
    assert "x 2 processes" in proc.stdout and proc.stdout.count("checkpoint: ") == 1  # rank 0 alone prints
    log = [json.loads(line) for line in (two_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # rank 0 alone logs
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in history_one], rel=1e-5)
    assert [r["lr"] for r in log] == pytest.approx([r["lr"] for r in history_one])
    assert sorted(p.name for p in two_dir.glob("*.pth")) == ["checkpoint-0000002.pth", "checkpoint-best.pth"]

    ddp = load_checkpoint(two_dir / "checkpoint-0000002.pth")["model"]
    single = one.model.state_dict()
    assert ddp.keys() == single.keys()  # no "module." prefix
    initial = Pretrainer(one.cfg, backend, show_progress=False).model.state_dict()
    moved = max((single[k] - v).abs().max().item() for k, v in initial.items())
    diff = max((single[k] - v).abs().max().item() for k, v in ddp.items())
    assert diff < 1e-6 < moved, (diff, moved)


@pytest.mark.slow
def test_unreadable_batch_on_one_rank_is_skipped_by_all(photo_dir, tmp_path):
    """Batch 1 per process: whenever a rank draws the corrupt file, every rank skips that micro-batch
    (DDP needs all of them in each gradient exchange); the count is summed over ranks."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    (data / "broken.png").write_bytes((data / "chelsea.png").read_bytes()[:200])
    out = tmp_path / "run"
    proc = _torchrun(2, "--no-progress", *tiny_overrides(out, **{"data.path": str(data), "train.batch_size": 1,
                                                                "train.accum_steps": 2, "train.epochs": 1,
                                                                "train.seed": 3}))
    # 7 files x repeat 2 = 14 items = 3 steps of 2 x 2 (2 dropped). With seed 3 rank 0 draws the broken file
    # as the 2nd micro-batch of step 1 (the one DDP would synchronise) and the 1st of step 3.
    assert proc.stdout.count("unreadable image(s)") == 1 and "epoch 0: skipped" in proc.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] is not None for r in log)
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out / "checkpoint-0000003.pth")["model"].values())


def test_a_torchrun_job_refuses_another_runs_folder_on_every_rank(photo_dir, tmp_path):
    """Every process checks the folder's owner (not rank 0 alone), so no rank is left waiting in a
    collective: the job ends at once, each rank with the same one-line error, the other run untouched."""
    out = tmp_path / "run"
    overrides = tiny_overrides(out, **{"data.path": str(photo_dir), "train.max_steps": 1})
    from mimsparse.config import load_config
    from mimsparse.train.build import Pretrainer

    Pretrainer(load_config(None, overrides), "dense", show_progress=False).run()  # the other run
    before = {p.name: p.read_bytes() for p in out.glob("checkpoint-*.pth")}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "pretrain.py"), "--no-progress", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    refused = [line for line in proc.stderr.splitlines() if "holds the files of another run" in line]
    assert len(refused) == 2 and all(line.startswith("error: output folder") for line in refused), proc.stderr
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint-*.pth")} == before


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_match_one_process_with_the_global_batch(photo_dir, tmp_path, rendezvous):
    """Two "nodes" on this machine: two torchrun launchers (--nnodes 2 --nproc-per-node 1), meeting
    through a c10d rendezvous (ranks in order of arrival) or the static one (--node-rank 0/1,
    --master-addr); after 2 steps the weights equal one process's with the global batch."""
    common = {"data.path": str(photo_dir), "train.max_steps": 2}
    one = Pretrainer(load_config(None, tiny_overrides(tmp_path / "one", **common, **{"train.batch_size": 4})),
                     "dense", show_progress=False)
    one.run()

    out, port = tmp_path / "nodes", _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launchers = []
    for node in (0, 1):
        if rendezvous == "c10d":
            meet = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                    "--local-addr", "127.0.0.1"]
        else:
            meet = ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *meet,
               str(ROOT / "tools" / "pretrain.py"), "--no-progress", *tiny_overrides(out, **common,
                                                                                    **{"train.batch_size": 2})]
        launchers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                          cwd=ROOT))
    outputs = []
    try:
        for proc in launchers:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in launchers:
            proc.kill()
    for proc, (stdout, stderr) in zip(launchers, outputs):
        assert proc.returncode == 0, f"a node failed ({proc.returncode}):\n{stdout}\n{stderr}"
    printed = "".join(stdout for stdout, _ in outputs)
    assert "batch 2 x 2 processes" in printed and printed.count("checkpoint: ") == 1  # global rank 0 alone

    nodes = load_checkpoint(out / "checkpoint-0000002.pth")["model"]
    single = one.model.state_dict()
    initial = Pretrainer(one.cfg, "dense", show_progress=False).model.state_dict()
    moved = max((single[k] - v).abs().max().item() for k, v in initial.items())
    diff = max((single[k] - v).abs().max().item() for k, v in nodes.items())
    assert nodes.keys() == single.keys() and diff < 1e-6 < moved, (diff, moved)


@pytest.mark.slow
def test_finetuning_on_two_processes_matches_one_with_the_global_batch(tmp_path):
    """tools/finetune.py under torchrun: each process trains on its share of every global batch and
    evaluates its share of the test images; 2 processes x batch 2 x 2 accumulated micro-batches (DDP
    exchanges the gradients at the second only) give the losses, top-1 and weights of 1 x batch 8 (drop
    path and mixup off: their draws are per process). Rank 0 alone prints and writes."""
    from tests.test_finetune import tool_main
    from tests.test_finetune_runs import records

    run = ["--checkpoint", "random", "--model", "convnextv2_atto", "--data", "lfw-subset", "--label-fraction", "0.2",
           "--eval-limit", "10", "--img-size", "32", "--no-progress", "--drop-path", "0", "--epochs", "2",
           "--warmup-epochs", "0.5", "--log-every", "1"]
    assert tool_main("finetune")([*run, "--batch-size", "8", "--output-dir", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "finetune.py"), *run, "--batch-size", "2", "--accum-iter", "2", "--output-dir",
           str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("epoch 1: step 6 |") == 1
    assert "batch 2 x 2 processes x 2 accumulated | lr 3.13e-05 (--blr 0.001 x 8/256)" in proc.stdout
    ones, twos = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["test_correct"] for r in twos] == [r["test_correct"] for r in ones]
    assert [r["test_total"] for r in twos] == [10, 10]  # the two shards cover the test images once
    for key in ("train_loss", "test_loss", "lr"):
        assert [r[key] for r in twos] == pytest.approx([r[key] for r in ones], rel=1e-5)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["processes"] == 2 and results["steps"] == 6
    a = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
