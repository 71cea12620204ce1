"""Runs that survive a cluster, tested the way the faults happen: a real signal sent to a real
process (alone and under torchrun), a real second process aimed at a held folder, a real full file
system (a small tmpfs, when running as root)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mimsparse.config import load_config
from mimsparse.train.checkpoint import load_checkpoint
from mimsparse.train.build import Pretrainer
from mimsparse.train.stop_signal import STOP_EXIT_STATUS
from tests.conftest import ROOT, tiny_overrides

# 6 photos x repeat 4 / batch 4: 6 steps per epoch, 12 in all
STEPS, PER_EPOCH = 12, 6


def _overrides(out, photo_dir, **extra):
    return tiny_overrides(out, **{"data.path": str(photo_dir), "data.repeat": 4, "train.log_every": 1, **extra})


def _reference(tmp_path, photo_dir, **extra):
    """The same run, never interrupted, in this process."""
    return Pretrainer(load_config(None, _overrides(tmp_path / "reference", photo_dir, **extra)), "dense",
                      show_progress=False).run()


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _start(cmd):
    """A tool as a user starts it; stdout and stderr merged, read line by line."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)


def _pretrain_cmd(*args):
    return [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--no-progress", *args]


def _read_until(proc, pattern, lines, timeout=180):
    """Lines of ``proc`` until one matches ``pattern`` (returned); a watchdog kills a hung process."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                return line
    finally:
        watchdog.cancel()
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(lines)}")


def _finish(proc, lines, timeout=180):
    out, _ = proc.communicate(timeout=timeout)
    lines.append(out)
    return "".join(lines)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---- 1. a signal stops the run after the step in progress, with a checkpoint ----------------------------
@pytest.mark.slow
def test_sigterm_mid_epoch_saves_the_step_and_resume_repeats_nothing(photo_dir, tmp_path):
    out = tmp_path / "run"
    proc = _start(_pretrain_cmd(*_overrides(out, photo_dir)))
    lines = []
    _read_until(proc, r"^step 2 \|", lines)
    proc.send_signal(signal.SIGTERM)
    text = _finish(proc, lines)
    assert proc.returncode == STOP_EXIT_STATUS, text
    stopped = re.search(r"^stopped by SIGTERM at step (\d+) \(epoch 0, batch (\d+)\): checkpoint (\S+); continue "
                        r"with --resume auto \(exit status 75\)$", text, re.M)
    assert stopped, text
    step = int(stopped.group(1))
    assert 2 <= step < PER_EPOCH and int(stopped.group(2)) == step  # mid-epoch: the step in progress was finished
    assert stopped.group(3) == str(out / f"checkpoint-{step:07d}.pth")
    assert "Traceback" not in text
    # verified and recorded like any other checkpoint; best unchanged (epoch 0 has not ended: none yet)
    record = json.loads((out / "run.json").read_text())
    assert list(record["checkpoints"]) == [f"checkpoint-{step:07d}.pth"]
    assert not (out / "checkpoint-best.pth").exists()
    ckpt = load_checkpoint(out / f"checkpoint-{step:07d}.pth")
    assert ckpt["run"]["step"] == step and ckpt["run"]["batch_in_epoch"] == step
    assert [r["step"] for r in _log(out)] == list(range(1, step + 1))

    resumed = _start(_pretrain_cmd("--resume", "auto", *_overrides(out, photo_dir)))
    text = _finish(resumed, [])
    assert resumed.returncode == 0, text
    assert f"resumed from {out / f'checkpoint-{step:07d}.pth'} at step {step}" in text
    full = _reference(tmp_path, photo_dir)
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # no step repeated, none lost
    assert [r["loss"] for r in log] == [r["loss"] for r in full["history"]]
    ours, theirs = load_checkpoint(out / "checkpoint-best.pth"), load_checkpoint(full["checkpoint"].parent /
                                                                                   "checkpoint-best.pth")
    assert ours["run"]["best_loss"] == theirs["run"]["best_loss"]  # the stopped epoch's mean counts all its steps
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])


@pytest.mark.slow
def test_a_second_signal_exits_at_once(photo_dir, tmp_path):
    out = tmp_path / "run"
    proc = _start(_pretrain_cmd(*_overrides(out, photo_dir, **{"train.stop_signals": "SIGUSR1"})))
    lines = []
    _read_until(proc, r"^step 1 \|", lines)
    proc.send_signal(signal.SIGUSR1)
    _read_until(proc, r"^SIGUSR1 received: stopping after this step", lines)
    proc.send_signal(signal.SIGUSR1)
    text = _finish(proc, lines)
    assert proc.returncode == -signal.SIGUSR1, text  # ended by the signal, not by a clean stop
    assert "SIGUSR1 received again: exiting at once" in text and "stopped by" not in text
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_the_signal_set_is_configurable(photo_dir, tmp_path):
    from mimsparse.errors import ConfigError
    from mimsparse.train.stop_signal import parse_signals

    assert parse_signals("TERM, sigusr1") == (signal.SIGTERM, signal.SIGUSR1) and parse_signals("") == ()
    with pytest.raises(ConfigError, match=r"train.stop_signals: 'SIGKILL' is not a signal a run can catch"):
        Pretrainer(load_config(None, _overrides(tmp_path, photo_dir, **{"train.stop_signals": "SIGKILL"})), "dense")
    # without SIGTERM in the set, SIGTERM kills the run as before: no checkpoint at the step
    out = tmp_path / "plain"
    proc = _start(_pretrain_cmd(*_overrides(out, photo_dir, **{"train.stop_signals": "SIGUSR1"})))
    lines = []
    _read_until(proc, r"^step 1 \|", lines)
    proc.send_signal(signal.SIGTERM)
    _finish(proc, lines)
    assert proc.returncode == -signal.SIGTERM and not list(out.glob("checkpoint-*.pth"))


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"])


# tools/launch.py: torchrun with the one-process exit status of a stop (plain torchrun exits 1)
_LAUNCH = [sys.executable, str(ROOT / "tools" / "launch.py"), "--standalone", "--nproc-per-node=2",
           str(ROOT / "tools" / "pretrain.py"), "--no-progress"]
_LAUNCH_STOPPED = "launch: every process stopped with a checkpoint (exit status 75: requeue, then --resume auto)"


@pytest.mark.slow
def test_a_signal_to_one_torchrun_rank_stops_every_rank_at_the_same_step(photo_dir, tmp_path):
    """SIGTERM to rank 1 alone (rank 0 writes): the ranks agree on the flag collectively, so rank 0
    writes the checkpoint at that step and no rank waits in an all-reduce; the resumed job repeats no
    step and its losses are those of the job that was never stopped."""
    out = tmp_path / "run"
    common = {"train.batch_size": 2}  # x 2 processes: the global batch of the one-process reference
    proc = _start([*_LAUNCH, *_overrides(out, photo_dir, **common)])
    lines = []
    _read_until(proc, r"^step 2 \|", lines)
    workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)
    text = _finish(proc, lines)
    assert proc.returncode == STOP_EXIT_STATUS, text  # plain torchrun reports its workers' 75 as a failure (1)
    assert _LAUNCH_STOPPED in text and "Traceback" not in text
    stopped = re.search(r"^stopped by (.*) at step (\d+) \(epoch 0", text, re.M)
    assert stopped and stopped.group(1) == "a signal to another process of the job", text  # rank 0 was not
    step = int(stopped.group(2))
    assert 2 <= step < PER_EPOCH and (out / f"checkpoint-{step:07d}.pth").is_file()

    resumed = _start([*_LAUNCH, "--resume", "auto", *_overrides(out, photo_dir, **common)])
    text = _finish(resumed, [])
    assert resumed.returncode == 0, text
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    full = _reference(tmp_path, photo_dir, **{"train.batch_size": 4})
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in full["history"]], rel=1e-5)


@pytest.mark.slow
def test_a_signal_to_the_launcher_ends_the_job_with_a_checkpoint_and_status_75(photo_dir, tmp_path):
    """srun, a pod's SIGTERM and Ctrl-C signal torchrun, not its workers (they run in sessions of their
    own): torchrun forwards the signal, then raises and exits 1, keeping none of their statuses. The
    launcher also forwards SLURM's SIGUSR1, which plain torchrun dies of."""
    out = tmp_path / "run"
    proc = _start([*_LAUNCH, *_overrides(out, photo_dir, **{"train.batch_size": 2})])
    lines = []
    _read_until(proc, r"^step 2 \|", lines)
    proc.send_signal(signal.SIGUSR1)
    text = _finish(proc, lines)
    assert proc.returncode == STOP_EXIT_STATUS, text
    assert _LAUNCH_STOPPED in text and "Traceback" not in text
    stopped = re.search(r"^stopped by SIGUSR1 at step (\d+) \(epoch 0", text, re.M)
    assert stopped, text
    step = int(stopped.group(1))
    assert list(json.loads((out / "run.json").read_text())["checkpoints"]) == [f"checkpoint-{step:07d}.pth"]
    assert load_checkpoint(out / f"checkpoint-{step:07d}.pth")["run"]["step"] == step


@pytest.mark.slow
def test_the_launcher_says_75_only_when_every_worker_stopped_with_a_checkpoint(photo_dir, tmp_path):
    """Workers that do not catch the signal die of it: no checkpoint, so no 75 but 128 + the signal."""
    out = tmp_path / "run"
    proc = _start([*_LAUNCH, *_overrides(out, photo_dir, **{"train.batch_size": 2, "train.stop_signals": ""})])
    lines = []
    _read_until(proc, r"^step 2 \|", lines)
    proc.send_signal(signal.SIGTERM)
    text = _finish(proc, lines)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "launch: SIGTERM ended the job before every process had stopped with a checkpoint" in text
    assert _LAUNCH_STOPPED not in text and not list(out.glob("checkpoint-*.pth"))


def test_the_launcher_needs_a_note_from_every_local_worker(tmp_path):
    from mimsparse.train.launch import every_worker_stopped

    assert not every_worker_stopped(tmp_path)
    (tmp_path / "local-rank-1").write_text("2")
    assert not every_worker_stopped(tmp_path)  # rank 0 did not stop with a checkpoint
    (tmp_path / "local-rank-0").write_text("2")
    assert every_worker_stopped(tmp_path)


def test_a_restarted_worker_takes_back_its_earlier_rounds_note(tmp_path, monkeypatch):
    """torchrun --max-restarts starts the workers again after a round that stopped: only the last round's
    stop may make the launcher say 75."""
    from mimsparse.train.stop_signal import STOP_NOTES_ENV, StopSignal, stopped_with_checkpoint

    monkeypatch.setenv(STOP_NOTES_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert stopped_with_checkpoint() == STOP_EXIT_STATUS
    assert (tmp_path / "local-rank-1").read_text() == "2"
    with StopSignal(""):
        assert not (tmp_path / "local-rank-1").exists()


# ---- 1b. no signal at all (OOM killer, a lost node): checkpoints within the epoch bound the loss ----------
@pytest.mark.slow
def test_a_sigkill_mid_epoch_loses_only_the_steps_since_the_last_periodic_checkpoint(photo_dir, tmp_path):
    out = tmp_path / "run"
    every = {"train.save_every_steps": 2, "train.keep_last": 0, "train.epochs": 4}  # 24 steps, 6 an epoch
    proc = _start(_pretrain_cmd(*_overrides(out, photo_dir, **every)))
    lines = []
    _read_until(proc, r"^step 9 \|", lines)  # in epoch 1, past its first periodic checkpoint (step 8)
    proc.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    proc.wait()
    log = _log(out)
    killed_at = log[-1]["step"]
    assert 9 <= killed_at < 4 * PER_EPOCH
    saved = sorted(int(p.stem.split("-")[1]) for p in out.glob("checkpoint-[0-9]*.pth"))
    assert saved == list(range(2, killed_at + 1, 2))  # every 2 steps, within epochs too (2, 4, 8 ...)
    mid = load_checkpoint(out / "checkpoint-0000008.pth")["run"]
    assert (mid["epoch"], mid["batch_in_epoch"], mid["epoch_loss_count"]) == (1, 2, 2)
    assert mid["epoch_loss_sum"] == pytest.approx(sum(r["loss"] for r in log[6:8]))

    resumed = _start(_pretrain_cmd("--resume", "auto", *_overrides(out, photo_dir, **every)))
    text = _finish(resumed, [])
    assert resumed.returncode == 0, text
    assert f"resumed from {out / f'checkpoint-{saved[-1]:07d}.pth'} at step {saved[-1]}" in text
    full = _reference(tmp_path, photo_dir, **{"train.epochs": 4})  # never killed, no periodic checkpoints
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 4 * PER_EPOCH + 1))  # the killed steps redone once
    assert [r["loss"] for r in log] == [r["loss"] for r in full["history"]]
    ours, theirs = load_checkpoint(out / "checkpoint-best.pth"), load_checkpoint(full["checkpoint"].parent /
                                                                                   "checkpoint-best.pth")
    assert ours["run"]["best_loss"] == theirs["run"]["best_loss"]
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])


def test_checkpoints_every_few_minutes_within_the_epoch(photo_dir, tmp_path):
    from mimsparse.train.run_checkpoints import RunCheckpoints

    out = tmp_path / "run"
    # 0.0001 minutes = 6 ms: less than one step, so every step within an epoch is due
    cfg = load_config(None, _overrides(out, photo_dir, **{"train.save_every_minutes": 0.0001, "train.keep_last": 0}))
    run = Pretrainer(cfg, "dense", show_progress=False)
    saved_at = []
    real_save = RunCheckpoints.save
    run.save = lambda *args: saved_at.append(run.state.step) or real_save(run, *args)
    run.run()
    assert saved_at == list(range(1, STEPS + 1))  # the epoch ends (6, 12) once each, with best
    record = json.loads((out / "run.json").read_text())
    assert sorted(set(record["checkpoints"]) - {"checkpoint-best.pth"}) == [
        f"checkpoint-{s:07d}.pth" for s in range(1, STEPS + 1)]
    off = Pretrainer(load_config(None, _overrides(tmp_path / "off", photo_dir, **{"train.keep_last": 0})), "dense",
                     show_progress=False)
    off.run()
    assert sorted(p.name for p in (tmp_path / "off").glob("checkpoint-[0-9]*.pth")) == [
        f"checkpoint-{s:07d}.pth" for s in (PER_EPOCH, STEPS)]


def test_checkpoints_within_epochs_do_not_push_the_epochs_checkpoints_out(photo_dir, tmp_path):
    """keep_last counts the checkpoints of epoch ends and run ends (train.max_steps); of the resume
    points (periodic, or a signal's stop) only the newest is kept, until the next checkpoint supersedes
    it, across a resume too. What is on disk after each save:"""
    from mimsparse.train.checkpoint_manager import step_checkpoints

    out = tmp_path / "run"
    every = {"train.save_every_steps": 2, "train.keep_last": 2, "train.epochs": 4}  # 24 steps, 6 an epoch
    on_disk = []

    def step_of(name) -> int:
        return int(Path(name).stem.split("-")[1])

    def watched(run):
        save = run.checkpoints.save

        def save_and_look(*args, **kwargs):
            path = save(*args, **kwargs)
            resume_point = json.loads((out / "run.json").read_text())["resume_point"]
            on_disk.append([step_of(p) for p in step_checkpoints(out)]
                           + ([f"{step_of(resume_point)} resumes"] if resume_point else []))
            return path
        run.checkpoints.save = save_and_look
        return run

    watched(Pretrainer(load_config(None, _overrides(out, photo_dir, **every, **{"train.max_steps": 15})), "dense",
                       show_progress=False)).run()
    assert on_disk == [[2, "2 resumes"], [4, "4 resumes"], [6], [6, 8, "8 resumes"], [6, 10, "10 resumes"], [6, 12],
                       [6, 12, 14, "14 resumes"], [12, 15]]  # 15: the run's end
    assert json.loads((out / "run.json").read_text())["resume_point"] is None
    resumed = watched(Pretrainer(load_config(None, _overrides(out, photo_dir, **every)), "dense", show_progress=False))
    resumed.load("auto")
    assert resumed.state.step == 15
    on_disk.clear()
    resumed.run()
    assert on_disk == [[12, 15, 16, "16 resumes"], [15, 18], [15, 18, 20, "20 resumes"], [15, 18, 22, "22 resumes"],
                       [18, 24]]
    assert set(json.loads((out / "run.json").read_text())["checkpoints"]) == {
        "checkpoint-0000018.pth", "checkpoint-0000024.pth", "checkpoint-best.pth"}


def test_the_periodic_checkpoint_settings_refuse_negative_values(photo_dir, tmp_path):
    from mimsparse.errors import ConfigError

    for key, value in (("train.save_every_steps", -1), ("train.save_every_minutes", -0.5)):
        with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}' must be >= 0"):
            Pretrainer(load_config(None, _overrides(tmp_path / "run", photo_dir, **{key: value})), "dense")
    with pytest.raises(ConfigError, match=r"'train.save_every_minutes' must be a finite number"):
        load_config(None, _overrides(tmp_path / "run", photo_dir, **{"train.save_every_minutes": "nan"}))


# ---- 2. one process per run folder ----------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_process_is_refused_a_held_folder_and_a_killed_holder_needs_no_clean_up(photo_dir, tmp_path):
    out = tmp_path / "run"
    args = _overrides(out, photo_dir, **{"train.epochs": 40})  # long enough to be running when the second starts
    first = _start(_pretrain_cmd(*args))
    lines = []
    _read_until(first, r"^step 1 \|", lines)
    second = _start(_pretrain_cmd(*args))  # the same start again: a requeued job whose old copy still runs
    text = _finish(second, [], timeout=120)
    assert second.returncode == 2, text
    assert re.fullmatch(rf"error: output folder '{re.escape(str(out))}' is in use by another run \(host \S+, PID "
                        rf"{first.pid}, pretrain.py, since [^)]+\); wait for it to end or stop it, then resume with "
                        rf"--resume auto, or choose another folder with --output-dir DIR\n", text), text
    first.send_signal(signal.SIGTERM)
    text = _finish(first, lines)
    assert first.returncode == STOP_EXIT_STATUS, text
    step = int(re.search(r"^stopped by SIGTERM at step (\d+)", text, re.M).group(1))
    # exactly one run's files: every step once, the checkpoints that run recorded
    assert [r["step"] for r in _log(out)] == list(range(1, step + 1))
    record = json.loads((out / "run.json").read_text())
    assert set(record["checkpoints"]) <= {p.name for p in out.glob("checkpoint-*.pth")}
    assert f"checkpoint-{step:07d}.pth" in record["checkpoints"]

    # SIGKILL the holder: the kernel drops the lock, --resume auto starts with no clean-up
    killed = _start(_pretrain_cmd("--resume", "auto", *args))
    _read_until(killed, rf"^step {step + 1} \|", [])
    killed.kill()
    killed.wait()
    again = _start(_pretrain_cmd("--resume", "auto", *args))
    lines = []
    _read_until(again, r"^step \d+ \|", lines)  # resumed and training (the handlers are in)
    resumed = re.search(r"^resumed from \S+ at step (\d+)$", "".join(lines), re.M)
    assert resumed and int(resumed.group(1)) >= step, "".join(lines)  # (the killed run may have saved its epoch)
    again.send_signal(signal.SIGTERM)
    text = _finish(again, [])
    assert again.returncode == STOP_EXIT_STATUS, text


def test_a_start_that_fails_before_its_first_step_leaves_no_folder(photo_dir, tmp_path):
    from mimsparse.errors import DataError

    out = tmp_path / "new" / "run"
    with pytest.raises(DataError):
        Pretrainer(load_config(None, _overrides(out, tmp_path / "no-such-photos")), "dense")
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    with pytest.raises(DataError):  # a folder the user made is theirs: kept (and let go)
        Pretrainer(load_config(None, _overrides(out, tmp_path / "no-such-photos")), "dense")
    assert out.is_dir() and Pretrainer(load_config(None, _overrides(out, photo_dir)), "dense").folder is not None


def test_a_start_that_loses_the_race_for_a_new_folder_leaves_the_winners_run(tmp_path, monkeypatch):
    """Two starts aimed at one new folder at once both find it missing, so both think they create it;
    one takes the lock. The refused one must not remove the folder (the winner's run is in it). The
    order is forced (a real second process takes the lock between this start's look at the folder and
    its own lock); the lock conflict is the kernel's."""
    import mimsparse.train.checkpoint as checkpoint
    from mimsparse.train.run_folder import FolderBusy, RunFolder

    out = tmp_path / "new" / "run"
    winner_code = ("import sys; from mimsparse.train.run_folder import RunFolder; "
                   "held = RunFolder(sys.argv[1], 'winner'); open(sys.argv[1] + '/log.txt', 'w').write('step 1'); "
                   "print('held', flush=True); sys.stdin.read()")
    real_check, winners = checkpoint.check_writable_dir, []

    def the_winner_locks_first(folder):
        real_check(folder)
        winners.append(subprocess.Popen([sys.executable, "-c", winner_code, str(folder)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT))
        assert winners[-1].stdout.readline() == "held\n"

    monkeypatch.setattr(checkpoint, "check_writable_dir", the_winner_locks_first)
    try:
        with pytest.raises(FolderBusy, match="is in use by another run"):
            RunFolder(out, "loser")
        assert (out / "log.txt").read_text() == "step 1"
    finally:
        for proc in winners:
            proc.stdin.close()
            proc.wait(timeout=60)


# ---- 3. every write failure is one line ----------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 70 MiB file system: room for one checkpoint of the tiny run (~42 MiB), not for a second
    beside it (the atomic write needs both)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70m", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _one_line(capsys, main):
    from mimsparse.cli import run_cli

    capsys.readouterr()
    assert run_cli(main) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_real_full_disk_during_a_checkpoint_is_one_line(photo_dir, small_tmpfs):
    out = small_tmpfs / "run"
    trainer = Pretrainer(load_config(None, _overrides(out, photo_dir, **{"train.tensorboard": False})), "dense",
                         show_progress=False)
    from mimsparse.cli import one_line
    from mimsparse.errors import OutputError

    with pytest.raises(OutputError) as failed:
        trainer.run()
    writer_error = failed.value.__cause__.__cause__  # what torch's zip writer raised on the full disk
    assert isinstance(writer_error, RuntimeError) and "inline_container.cc" in str(writer_error), writer_error
    err = f"error: {one_line(failed.value)}"  # what run_cli prints
    assert err == (f"error: cannot write '{out / 'checkpoint-0000012.pth'}' (No space left on device); the previous "
                   f"checkpoint '{out / 'checkpoint-0000006.pth'}' is kept. Free disk space or choose another "
                   f"output path")
    assert sorted(p.name for p in out.iterdir() if p.name.endswith((".pth", ".tmp"))) == \
        ["checkpoint-0000006.pth", "checkpoint-best.pth"]  # no partial file left
    assert load_checkpoint(out / "checkpoint-0000006.pth")["run"]["step"] == 6


def test_a_real_full_disk_for_safetensors_and_logs_is_one_line(small_tmpfs, capsys, tmp_path):
    from mimsparse.convert.export import save_weights
    from mimsparse.train.run_log import RunLog

    ballast = small_tmpfs / "ballast"
    with open(ballast, "wb") as f:  # fill the file system to its last ~1 MiB
        f.write(b"\0" * (69 << 20))
    sd = {"w": torch.ones(1 << 20)}  # 4 MiB
    err = _one_line(capsys, lambda: save_weights(sd, small_tmpfs / "model.safetensors"))
    assert err == (f"error: cannot write '{small_tmpfs / 'model.safetensors'}' (No space left on device); nothing "
                   f"was written. Free disk space or choose another output path")
    log = RunLog(small_tmpfs / "log.jsonl")
    err = _one_line(capsys, lambda: log.write({"step": 1, "text": "x" * (2 << 20)}))
    assert err == (f"error: cannot write the training log '{small_tmpfs / 'log.jsonl'}' (No space left on device); "
                   f"the checkpoints in '{small_tmpfs}' are kept. Free disk space, then resume with --resume auto")
    assert sorted(p.name for p in small_tmpfs.iterdir()) in (["ballast"], ["ballast", "log.jsonl"])


@pytest.mark.parametrize("raised", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 42747712 vs 42747604"),
    RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),
])
def test_torch_zip_writer_failures_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, raised):
    import mimsparse.train.checkpoint as checkpoint
    from mimsparse.errors import OutputError

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"x" * 100)
        raise raised

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OutputError, match=r"cannot write '.*ckpt.pth' \(.*\); nothing was written\. Free disk space"):
        checkpoint.save_checkpoint({"a": 1}, tmp_path / "ckpt.pth")
    assert list(tmp_path.iterdir()) == []

    def buggy_save(obj, f, *args, **kwargs):
        raise RuntimeError("Can't pickle local object")  # a bug: not an output fault

    monkeypatch.setattr(checkpoint.torch, "save", buggy_save)
    with pytest.raises(RuntimeError, match="Can't pickle") as bug:
        checkpoint.save_checkpoint({"a": 1}, tmp_path / "ckpt.pth")
    assert not isinstance(bug.value, OutputError) and list(tmp_path.iterdir()) == []


def test_a_tensorboard_write_failure_is_one_line(photo_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    out = tmp_path / "run"
    trainer = Pretrainer(load_config(None, _overrides(out, photo_dir)), "dense", show_progress=False)
    err = _one_line(capsys, trainer.run)
    assert err == (f"error: cannot write the TensorBoard events in '{out / 'tensorboard'}' (No space left on device); "
                   f"the checkpoints in '{out}' are kept. Free disk space, then resume with --resume auto (or set "
                   f"train.tensorboard=false)")


# ---- the same for finetuning ----------------------------------------------------------------------------
FINETUNE = ["--checkpoint", "random", "--model", "convnextv2_atto", "--data", "lfw-subset", "--label-fraction", "0.4",
            "--eval-limit", "10", "--img-size", "32", "--batch-size", "8", "--no-progress", "--mixup", "0.8",
            "--warmup-epochs", "0.5", "--epochs", "2"]


def _finetune_cmd(*args):
    return [sys.executable, str(ROOT / "tools" / "finetune.py"), *FINETUNE, *args]


@pytest.mark.slow
def test_finetune_stops_on_a_signal_mid_epoch_and_resumes_exactly(tmp_path):
    from tests.test_finetune_runs import records
    from tests.test_finetune import tool_main

    out = tmp_path / "split"
    proc = _start(_finetune_cmd("--output-dir", str(out)))
    lines = []
    _read_until(proc, r"^model convnextv2_atto \|", lines)  # the handlers are in: stop after the first step
    proc.send_signal(signal.SIGTERM)
    text = _finish(proc, lines)
    assert proc.returncode == STOP_EXIT_STATUS, text
    assert f"stopped by SIGTERM at step 1 (epoch 0, batch 1): checkpoint {out / 'last.pth'}; continue with " \
           f"--resume auto (exit status 75)" in text
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["epoch"] == 0 and last["step"] == 1 and last["part"]["batches_done"] == 1
    assert not (out / "log.jsonl").exists() and not (out / "best.safetensors").exists()  # epoch 0 not over

    resumed = _start(_finetune_cmd("--output-dir", str(out), "--resume", "auto"))
    text = _finish(resumed, [])
    assert resumed.returncode == 0, text
    assert "resumed from" in text and "epoch 0, batch 1, step 1" in text
    assert tool_main("finetune")([*FINETUNE, "--output-dir", str(tmp_path / "straight")]) == 0
    assert records(out) == records(tmp_path / "straight")  # losses, lrs, top-1: no step repeated or lost
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(out / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_sigkilled_finetune_resumes_exactly_from_its_periodic_last_pth(tmp_path):
    from tests.test_finetune_runs import records
    from tests.test_finetune import tool_main

    out = tmp_path / "killed"
    every = ["--save-every-steps", "2", "--log-every", "1"]  # 7 steps an epoch: saves at 2, 4, 6, 8, 10, 12
    proc = _start(_finetune_cmd("--output-dir", str(out), *every))
    lines = []
    _read_until(proc, r"^step 9 \|", lines)  # epoch 1, past its periodic save at step 8
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["epoch"] == 1 and last["step"] % 2 == 0 and 8 <= last["step"] < 14
    assert last["part"]["batches_done"] == last["step"] - 7  # the part of epoch 1 done, as a signal's stop has it

    resumed = _start(_finetune_cmd("--output-dir", str(out), "--resume", "auto", *every))
    text = _finish(resumed, [])
    assert resumed.returncode == 0, text
    assert f"epoch 1, batch {last['step'] - 7}, step {last['step']}" in text
    assert tool_main("finetune")([*FINETUNE, "--output-dir", str(tmp_path / "straight")]) == 0
    assert records(out) == records(tmp_path / "straight")  # losses, lrs, top-1: as if never killed
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(out / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_saves_every_few_minutes_within_the_epoch_and_refuses_bad_intervals(tmp_path, monkeypatch, capsys):
    import mimsparse.evaluate.finetune as finetune
    from mimsparse.cli import run_cli
    from tests.test_finetune import tool_main

    written = []
    real = finetune.save_resume_state

    def watched(path, run, epoch, step, history, best, part=None):
        written.append((epoch, step, None if part is None else part["batches_done"]))
        return real(path, run, epoch, step, history, best, part)

    monkeypatch.setattr(finetune, "save_resume_state", watched)
    # 0.0001 minutes = 6 ms, less than a step: every step within an epoch is due; the epoch ends save once
    assert tool_main("finetune")([*FINETUNE, "--output-dir", str(tmp_path / "run"), "--save-every-minutes",
                                  "0.0001"]) == 0
    assert written == [(0, s, s) for s in range(1, 7)] + [(1, 7, None)] + [(1, s, s - 7) for s in range(8, 14)] + [
        (2, 14, None)]
    for flag, value in (("--save-every-steps", "-1"), ("--save-every-minutes", "nan")):
        capsys.readouterr()
        main = tool_main("finetune")
        assert run_cli(lambda: main([*FINETUNE, "--output-dir", str(tmp_path / "bad"), flag, value])) == 2
        assert capsys.readouterr().err == f"error: {flag} must be 0 (off) or more, got {value}\n"


@pytest.mark.slow
def test_a_two_process_finetune_stops_on_a_signal_to_one_and_resumes_exactly(tmp_path):
    """DDP finetuning (2 processes, mixup and drop path on): SIGTERM to rank 1 alone stops both after the
    step in progress, rank 0 writes last.pth with every process's RNG state, the launcher exits 75, and
    the resumed job's losses, lrs, top-1 and weights equal those of a job that was never stopped. The
    resumed job also writes last.pth at every step on rank 0's clock (--save-every-minutes): both ranks
    must agree on each such save (it gathers their RNG states), or the job would hang."""
    from tests.test_finetune_runs import records

    launch = [sys.executable, str(ROOT / "tools" / "launch.py"), "--standalone", "--nproc-per-node=2",
              str(ROOT / "tools" / "finetune.py"), *FINETUNE, "--batch-size", "4"]
    out = tmp_path / "split"
    proc = _start([*launch, "--output-dir", str(out)])
    lines = []
    _read_until(proc, r"^model convnextv2_atto \|", lines)  # after DDP's set-up: both have their handlers
    workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)
    text = _finish(proc, lines)
    assert proc.returncode == STOP_EXIT_STATUS and _LAUNCH_STOPPED in text, text
    assert "batch 4 x 2 processes" in text
    assert "stopped by a signal to another process of the job at step 1 (epoch 0, batch 1)" in text
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["step"] == 1 and len(last["rng_per_process"]) == 2

    resumed = _start([*launch, "--output-dir", str(out), "--resume", "auto", "--save-every-minutes", "0.0001"])
    text = _finish(resumed, [])
    assert resumed.returncode == 0 and "epoch 0, batch 1, step 1" in text, text
    straight = _start([*launch, "--output-dir", str(tmp_path / "straight")])
    text = _finish(straight, [])
    assert straight.returncode == 0, text
    assert records(out) == records(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(out / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_stopped_finetune_resumes_on_another_split_of_its_global_batch_and_refuses_another(tmp_path, capsys):
    """Requeued on other hardware: stopped mid-epoch at batch 8 x 1, resumed at batch 4 x 2 accumulated
    (the same global batch): every step sees the same images, so the run equals the uninterrupted one;
    a resume at another global batch is refused in one line naming it and how to keep it."""
    from mimsparse.cli import run_cli
    from tests.test_finetune import tool_main
    from tests.test_finetune_runs import records

    run = [*FINETUNE, "--mixup", "0", "--drop-path", "0"]  # their draws differ by micro-batch
    out = tmp_path / "split"
    proc = _start([sys.executable, str(ROOT / "tools" / "finetune.py"), *run, "--output-dir", str(out)])
    lines = []
    _read_until(proc, r"^model convnextv2_atto \|", lines)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, lines) and proc.returncode == STOP_EXIT_STATUS
    main = tool_main("finetune")
    assert run_cli(lambda: main([*run, "--batch-size", "4", "--output-dir", str(out), "--resume", "auto"])) == 2
    assert re.fullmatch(r"error: .*last.pth was trained at a global batch of 8 \(8 x 1 process\(es\) x 1 "
                        r"accumulated\), this job's is 4 \(4 x 1 x 1\): keep the global batch .*; "
                        r"e.g. --accum-iter 2\n",
                        capsys.readouterr().err)
    assert main([*run, "--batch-size", "4", "--accum-iter", "2", "--output-dir", str(out), "--resume", "auto"]) == 0
    assert "epoch 0, batch 2, step 1" in capsys.readouterr().out  # 8 images done: 2 batches of 4
    assert main([*run, "--output-dir", str(tmp_path / "straight")]) == 0
    ours, theirs = records(out), records(tmp_path / "straight")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    assert [r["test_correct"] for r in ours] == [r["test_correct"] for r in theirs]
    for key in ("train_loss", "test_loss", "lr"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-5)


@pytest.mark.slow
def test_finetune_guards_its_folder_like_pretraining(tmp_path, capsys):
    from mimsparse.evaluate.finetune import RUN_FILES
    from tests.test_finetune import tool_main

    out = tmp_path / "ft"
    main = tool_main("finetune")
    short = [*FINETUNE[:-2], "--epochs", "1", "--max-steps", "2", "--output-dir", str(out)]
    assert main(short) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name in RUN_FILES}
    err = _one_line(capsys, lambda: main(short))  # a finished run is not overwritten without asking
    assert err == (f"error: output folder '{out}' holds the files of another run (4: last.pth, best.safetensors, "
                   f"results.json, log.jsonl); a new run there would mix with or delete them. Continue that run "
                   f"with --resume auto, choose another folder with --output-dir DIR, or replace it with --overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in RUN_FILES} == before
    assert main([*short, "--overwrite"]) == 0
    assert "--overwrite: deleted the previous run's 4 file(s)" in capsys.readouterr().out
    assert len((out / "log.jsonl").read_text().splitlines()) == 1

    # a second process is refused while this one holds the folder
    holder = _start(_finetune_cmd("--output-dir", str(tmp_path / "held"), "--epochs", "100"))  # still running
    lines = []
    _read_until(holder, r"^model convnextv2_atto \|", lines)
    second = _start(_finetune_cmd("--output-dir", str(tmp_path / "held")))
    text = _finish(second, [], timeout=120)
    assert second.returncode == 2 and re.fullmatch(
        rf"error: output folder '{re.escape(str(tmp_path / 'held'))}' is in use by another run \(host \S+, PID "
        rf"{holder.pid}, finetune.py, since [^)]+\); wait for it to end or stop it, then resume with --resume auto, "
        rf"or choose another folder with --output-dir DIR\n", text), text
    holder.kill()
    holder.wait()

    # a start that fails before its first step leaves no folder it created
    bad = tmp_path / "new" / "ft"
    err = _one_line(capsys, lambda: main([*FINETUNE, "--data", str(tmp_path / "nothing"), "--output-dir", str(bad)]))
    assert not (tmp_path / "new").exists(), err


def test_the_linear_probe_guards_its_folder_too(tmp_path, capsys):
    from tests.test_finetune import tool_main

    main = tool_main("linear_probe")
    out = tmp_path / "probe"
    args = ["--checkpoint", "random", "--model", "convnextv2_atto", "--data", "lfw-subset", "--train-limit", "16",
            "--eval-limit", "8", "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--no-progress",
            "--output-dir", str(out)]
    assert main(args) == 0
    results = (out / "results.json").read_text()
    err = _one_line(capsys, lambda: main(args))
    assert err == (f"error: output folder '{out}' holds the files of another run (2: results.json, log.jsonl); a new "
                   f"run there would mix with or delete them. Choose another folder with --output-dir DIR, or replace "
                   f"it with --overwrite")  # a probe has no --resume: not offered
    assert (out / "results.json").read_text() == results
    assert main([*args, "--overwrite"]) == 0
    assert "--overwrite: deleted the previous run's 2 file(s)" in capsys.readouterr().out
    bad = tmp_path / "new" / "probe"
    _one_line(capsys, lambda: main([*args[:-1], str(bad), "--data", str(tmp_path / "nothing")]))
    assert not (tmp_path / "new").exists()


def test_a_picture_that_cannot_be_written_is_one_line(photo_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "run"
    trainer = Pretrainer(load_config(None, _overrides(out, photo_dir, **{"train.vis_every": 2})), "dense",
                         show_progress=False)
    err = _one_line(capsys, trainer.run)
    assert err == (f"error: cannot write '{out / 'vis' / 'step-0000002.png'}' (No space left on device); training "
                   f"stopped and no checkpoint was written yet. Free disk space or turn the pictures off with "
                   f"train.vis_every=0")


_HOLDER = r"""
import pathlib, sys, time
from mimsparse.train.run_folder import FolderLock
pathlib.Path(sys.argv[1]).mkdir()
lock = FolderLock(sys.argv[1], "holder.py")
print("HELD", flush=True)
time.sleep(300)
"""


def test_the_official_import_is_refused_a_held_folder(photo_dir, tmp_path, capsys):
    import argparse

    from tests.test_official import DEC_DEPTH, DEC_DIM, NAME, official_fcmae_layout, random_state
    from tests.test_reliability import _tool

    torch.save({"model": random_state(official_fcmae_layout(NAME, DEC_DIM, DEC_DEPTH), seed=3),
                "args": argparse.Namespace(mask_ratio=0.6, norm_pix_loss=True)}, tmp_path / "official.pth")
    run = tmp_path / "run"
    holder = _start([sys.executable, "-c", _HOLDER, str(run)])
    _read_until(holder, r"^HELD", [])
    tool = _tool("convert_official")
    args = ["import", str(tmp_path / "official.pth"), "--output-dir", str(run), "--data", str(photo_dir),
            *tiny_overrides(run)]
    err = _one_line(capsys, lambda: tool.main(args))
    assert re.fullmatch(rf"error: output folder '{re.escape(str(run))}' is in use by another run \(host \S+, PID "
                        rf"{holder.pid}, holder.py, since [^)]+\); wait for it to end or stop it, then resume with "
                        rf"--resume auto, or choose another folder with --output-dir DIR", err), err
    assert sorted(p.name for p in run.iterdir()) == [".mimsparse.lock"]
    holder.kill()  # the kernel drops the lock with the process: no clean-up before the next start
    holder.wait()
    assert tool.main(args) == 0 and (run / "checkpoint-0000000.pth").is_file()


@pytest.mark.slow
def test_a_torchrun_job_aimed_at_a_held_folder_ends_on_every_rank(photo_dir, tmp_path):
    """Rank 0 alone takes the lock; the others learn it was refused through a collective, so no rank
    is left waiting."""
    run = tmp_path / "run"
    holder = _start([sys.executable, "-c", _HOLDER, str(run)])
    _read_until(holder, r"^HELD", [])
    try:
        job = _start([*_LAUNCH, *_overrides(run, photo_dir)])
        text = _finish(job, [], timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert job.returncode == 1 and _LAUNCH_STOPPED not in text  # a refusal is no stop: torchrun's report, 1
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, text
    assert any(re.fullmatch(rf"error: output folder '{re.escape(str(run))}' is in use by another run \(host \S+, PID "
                            rf"{holder.pid}, holder.py, since [^)]+\); wait for .*", e) for e in errors), text
    assert f"error: output folder '{run}': another process of this job could not take it (see its error line)" in errors
    assert sorted(p.name for p in run.iterdir()) == [".mimsparse.lock"]


@pytest.mark.slow
def test_a_signal_to_one_nodes_launcher_stops_both_nodes_with_status_75(photo_dir, tmp_path):
    """Two "nodes" (two launchers, c10d rendezvous, one process each); SLURM's warning reaches one
    launcher only: its worker stops, the other node's worker stops at the same step through the
    collective flag, rank 0 writes the one checkpoint, and both launchers exit 75."""
    from tests.test_distributed import _free_port

    out, port = tmp_path / "run", _free_port()
    meet = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--local-addr", "127.0.0.1"]
    args = _overrides(out, photo_dir, **{"train.batch_size": 2})
    nodes = [_start([sys.executable, str(ROOT / "tools" / "launch.py"), *meet, str(ROOT / "tools" / "pretrain.py"),
                     "--no-progress", *args]) for _ in range(2)]
    texts = [[], []]
    try:
        writer = _first_to_print(nodes, r"^step 2 \|", texts)
        nodes[1 - writer].send_signal(signal.SIGUSR1)  # the node that does not write the checkpoints
        texts = [_finish(node, lines) for node, lines in zip(nodes, texts)]
    finally:
        for node in nodes:
            node.kill()
    for node, text in zip(nodes, texts):
        assert node.returncode == STOP_EXIT_STATUS and _LAUNCH_STOPPED in text, text
    stopped = re.search(r"^stopped by a signal to another process of the job at step (\d+)", texts[writer], re.M)
    assert stopped, texts[writer]
    step = int(stopped.group(1))
    assert list(json.loads((out / "run.json").read_text())["checkpoints"]) == [f"checkpoint-{step:07d}.pth"]


def _first_to_print(procs, pattern, lines) -> int:
    """The index of the first process to print a line matching ``pattern`` (global rank 0 alone prints
    steps, and the c10d rendezvous gives rank 0 to either node)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        for i, proc in enumerate(procs):
            sel.register(proc.stdout, selectors.EVENT_READ, i)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                line = key.fileobj.readline()
                lines[key.data].append(line)
                if re.search(pattern, line):
                    return key.data
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(map(''.join, lines))}")


def test_save_interval_keeps_the_step_cadence_and_takes_the_agreed_clock():
    """Steps: every multiple (a resumed run keeps the cadence). Minutes: since the last save, unless the
    job agreed on rank 0's verdict. Finetuning's PeriodicSave is never due without a writer."""
    from mimsparse.evaluate.finetune_engine import PeriodicSave
    from mimsparse.train.save_interval import SaveInterval

    steps = SaveInterval(every_steps=5)
    assert [k for k in range(1, 16) if steps.due(k)] == [5, 10, 15]
    minutes = SaveInterval(every_minutes=1.0, saved_at=time.monotonic() - 61)
    assert minutes.due(3) and not minutes.due(3, time_is_up=False)
    minutes.saved()
    assert not minutes.due(3) and minutes.due(3, time_is_up=True)
    assert not any(SaveInterval().due(k) for k in range(1, 10))
    written = []
    periodic = PeriodicSave(every_steps=2)
    assert not periodic.due(2)
    periodic.write = lambda step, part: written.append(step)
    assert periodic.due(2) and not periodic.due(3)
    periodic.save(2, {})
    assert written == [2]
