#!/usr/bin/env python
"""Masked image modeling pretraining of a sparse encoder (ConvNeXt V2 or ResNet; FCMAE, SimMIM or SparK objective).

  tools/pretrain.py --config configs/fcmae_atto.yaml --backend dense [--data DIR|SHARDS|fashion-mnist]
                    [--img-size N|HxW] [--batch-size B] [--output-dir DIR] [--epochs N] [--blr LR]
                    [--mask-ratio R] [--init PATH] [key=value ...]
  tools/pretrain.py --output-dir DIR --resume auto [--epochs N] [key=value ...]   (continue a run)
  torchrun --standalone --nproc_per_node N tools/pretrain.py ...   (DDP: gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import argparse
import sys


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from mimsparse.backends import backend_names
    from mimsparse.config_cli import add_alias_flags, add_config_flag, config_keys_help

    p = argparse.ArgumentParser("FCMAE pretraining", add_help=add_help, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags and section.key=value overrides may stand anywhere among the options and\n"
                                       "apply in the order given, on top of --config: a later one wins\n"
                                       "(--batch-size 2 train.batch_size=3 trains at batch 3).\n"
                                       "--resume continues the run under its recorded config; flags and overrides given\n"
                                       "with it change it (each change is printed; the model, decoder and objective\n"
                                       "cannot change).\n"
                                       "Precision: train.amp=bf16 runs on CUDA, and on CPU with the dense and packed\n"
                                       "backends (minkowski and spconv refuse bf16); train.amp=fp16 needs CUDA.\n"
                                       "Several processes: torchrun --standalone --nproc_per_node N tools/pretrain.py\n"
                                       "(train.batch_size is per process; rank 0 logs and writes checkpoints).\n"
                                       "SIGTERM, SIGINT or SIGUSR1 (train.stop_signals) stop after the step in progress\n"
                                       "with a checkpoint; the exit status is then 75 (requeue, then --resume auto).\n"
                                       "One process at a time may write an output dir (an OS lock on its .mimsparse.lock).\n\n"
                                       + config_keys_help())
    p.add_argument("--config", default=None, help="YAML file from configs/ (defaults are in mimsparse/config.py)")
    p.add_argument("--backend", default="dense", choices=backend_names(), help="sparse backend (default: dense)")
    add_config_flag(p, "--data", "data.path", "ImageFolder or flat folder of images, tar shards ('shards/train-"
                    "{000000..000009}.tar', see tools/make_shards.py), or a built-in dataset (fashion-mnist, lfw-subset, "
                    "foolbox-imagenet: its training images) (default: bundled photos)")
    add_config_flag(p, "--data-path", "data.path", "", hidden=True, dest="data")  # MAE's spelling
    add_config_flag(p, "--img-size", "data.img_size", "training crop, N or HxW (e.g. 192x320), multiples of 32")
    add_config_flag(p, "--img", "data.img_size", "", hidden=True, dest="img_size")
    add_config_flag(p, "--batch-size", "train.batch_size", "images per process and step", type=int)
    add_config_flag(p, "--batch", "train.batch_size", "", hidden=True, dest="batch_size", type=int)
    add_config_flag(p, "--output-dir", "train.output_dir", "where checkpoints and logs go")
    add_config_flag(p, "--out-dir", "train.output_dir", "", hidden=True, dest="output_dir")
    add_alias_flags(p)
    add_config_flag(p, "--init", "model.init", "start the encoder from dense weights: a timm/torchvision "
                    ".pth/.pt/.bin/.safetensors, a timm model folder, an official ConvNeXt V2 checkpoint or a "
                    "convert_to_dense.py export; the classifier is ignored, the decoder starts fresh", metavar="PATH")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume from, or 'auto' for the newest one in the output dir that verifies")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output dir that holds another run's checkpoints, deleting them "
                        "(without it such a start is refused)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a plain line every train.log_every steps (the default when output is "
                        "not a terminal); logs still go to log.jsonl")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_config(args, updates: dict, device: str):
    """(config, resume point): the user's settings, or with --resume the checkpoint's config they change."""
    from mimsparse.config import _merge, config_from_dict, load_updates
    from mimsparse.train.checkpoint_manager import CheckpointManager
    from mimsparse.train.resume import resume_folder, resumed_config

    updates = _merge(load_updates(args.config), updates)
    if not args.resume:
        return config_from_dict(updates), None
    folder = resume_folder(args.resume, updates.get("train", {}).get("output_dir"))
    if folder is None:  # auto: the output folder the settings name
        folder = config_from_dict(updates).train.output_dir
    updates = _merge(updates, {"train": {"output_dir": str(folder)}})
    manager = CheckpointManager(folder, keep_last=0)
    if str(args.resume) == "auto":
        found = manager.load_latest(device)
        if found is None:  # nothing to resume: a fresh start
            return config_from_dict(updates), None
    else:
        found = (args.resume, manager.load(args.resume, device))
    return resumed_config(found[1], found[0], updates), found


def main(argv=None) -> int:
    from mimsparse.cli import interactive, parse_with_overrides, share_cores_between_processes
    from mimsparse.config_cli import ordered_updates, print_config

    parser = get_args_parser()
    args = parse_with_overrides(parser, argv)
    updates = ordered_updates(parser, argv)
    share_cores_between_processes()
    from mimsparse.train import distributed
    from mimsparse.train.build import build_run
    from mimsparse.train.stop_signal import stopped_with_checkpoint

    if args.print_config:
        print_config(resolve_config(args, updates, "cpu")[0])
        return 0
    env, device = distributed.init_from_env(args.device)
    try:
        cfg, resume = resolve_config(args, updates, device)
        show_progress = not args.no_progress and interactive()
        trainer = build_run(cfg, args.backend, device, resume=resume or args.resume, show_progress=show_progress,
                             overwrite=args.overwrite)
        say = print if env.is_main else (lambda *a, **k: None)
        batch = f"{cfg.train.batch_size}"
        if cfg.train.accum_steps > 1:
            batch += f" x {cfg.train.accum_steps} accumulation steps"
        if env.enabled:
            batch += f" x {env.world_size} processes"
        eff = cfg.train.batch_size * cfg.train.accum_steps * env.world_size
        lr = "optim.lr" if cfg.optim.lr > 0 else f"base_lr {cfg.optim.base_lr:g} x {eff}/256"
        say(f"model {cfg.model.name} | backend {args.backend} | device {device} | {len(trainer.dataset)} images | "
            f"batch {batch} | lr {trainer.lr:.3g} (= {lr}) | {trainer.total_steps} steps | output {trainer.out_dir}")
        if trainer.resumed_from:
            say(f"resumed from {trainer.resumed_from} at step {trainer.state.step}")
        result = trainer.run()
        done = [r for r in result["history"] if r["loss"] is not None]
        if done:
            say(f"loss: first {done[0]['loss']:.4f} (step {done[0]['step']}) -> "
                f"last {done[-1]['loss']:.4f} (step {done[-1]['step']})")
        if result["stopped_by"]:
            return stopped_with_checkpoint()  # 75; the checkpoint line was printed; a requeue script tests it
        if result["checkpoint"] is None and trainer.resumed_from:
            limit = cfg.train.max_steps and trainer.state.step >= cfg.train.max_steps
            more = "raise train.max_steps (0 = all epochs)" if limit else "raise --epochs"
            say(f"nothing to do: the run already did its {trainer.state.step} steps ({more} to go on); nothing was "
                f"written; checkpoint: {trainer.resumed_from}")
        else:
            say(f"checkpoint: {result['checkpoint']}")
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
