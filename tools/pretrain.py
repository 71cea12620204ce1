#!/usr/bin/env python
"""Masked image modeling pretraining of a sparse encoder (ConvNeXt V2 or ResNet; FCMAE, SimMIM or SparK objective).

  tools/pretrain.py --config configs/fcmae_atto.yaml --backend dense [--data DIR|SHARDS|fashion-mnist]
                    [--img-size N|HxW] [--batch-size B] [--output-dir DIR] [--init PATH] [key=value ...]
  torchrun --standalone --nproc_per_node N tools/pretrain.py ...   (DDP: gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import argparse
import os
import sys


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from mimsparse.backends import backend_names
    from mimsparse.cli_args import HIDDEN, add_batch_size, add_img_size, add_output_dir

    p = argparse.ArgumentParser("FCMAE pretraining", add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides: section.key=value, anywhere among the options, e.g. train.epochs=5\n"
                                       "optim.base_lr=1e-4.\n"
                                       "Precision: CPU trains in fp32; train.amp=bf16|fp16 needs CUDA and a backend\n"
                                       "that supports it (minkowski and spconv refuse bf16).\n"
                                       "Several processes: torchrun --standalone --nproc_per_node N tools/pretrain.py\n"
                                       "(train.batch_size is per process; rank 0 logs and writes checkpoints).")
    p.add_argument("--config", default=None, help="YAML file from configs/ (defaults are in mimsparse/config.py)")
    p.add_argument("--backend", default="dense", choices=backend_names(), help="sparse backend (default: dense)")
    p.add_argument("--data", default=None, help="ImageFolder or flat folder of images, tar shards ('shards/train-"
                   "{000000..000009}.tar', see tools/make_shards.py), or a built-in dataset (fashion-mnist, lfw-subset, "
                   "foolbox-imagenet: its training images) (default: bundled photos)")
    p.add_argument("--data-path", dest="data", default=HIDDEN, help=HIDDEN)  # MAE's spelling
    add_img_size(p, None, "training crop, N or HxW (e.g. 192x320), multiples of 32 (= data.img_size)")
    add_batch_size(p, None, "images per process and step (= train.batch_size)")
    add_output_dir(p, None, "where checkpoints and logs go (= train.output_dir)")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start the encoder from dense weights (= model.init): a timm/torchvision .pth/.pt/.bin/"
                        ".safetensors, a timm model folder, an official ConvNeXt V2 checkpoint or a "
                        "convert_to_dense.py export; the classifier is ignored, the decoder starts fresh")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume from, or 'auto' for the newest one in the output dir that verifies")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output dir that holds another run's checkpoints, deleting them "
                        "(without it such a start is refused)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to log.jsonl)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    from mimsparse.cli import parse_with_overrides

    args = parse_with_overrides(get_args_parser(), argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    from mimsparse.train import distributed
    from mimsparse.config import load_config
    from mimsparse.train.build import build_run

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.img_size is not None:
        overrides.append(f"data.img_size={args.img_size}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.init:
        overrides.append(f"model.init={args.init}")
    cfg = load_config(args.config, overrides)
    env, device = distributed.init_from_env(args.device)
    try:
        trainer = build_run(cfg, args.backend, device, resume=args.resume, show_progress=not args.no_progress,
                             overwrite=args.overwrite)
        say = print if env.is_main else (lambda *a, **k: None)
        batch = f"{cfg.train.batch_size}"
        if cfg.train.accum_steps > 1:
            batch += f" x {cfg.train.accum_steps} accumulation steps"
        if env.enabled:
            batch += f" x {env.world_size} processes"
        eff = cfg.train.batch_size * cfg.train.accum_steps * env.world_size
        say(f"model {cfg.model.name} | backend {args.backend} | device {device} | {len(trainer.dataset)} images | "
            f"batch {batch} | lr {trainer.lr:.3g} (= base_lr {cfg.optim.base_lr:g} x {eff}/256) | "
            f"{trainer.total_steps} steps | output {trainer.out_dir}")
        if trainer.resumed_from:
            say(f"resumed from {trainer.resumed_from} at step {trainer.state.step}")
        result = trainer.run()
        done = [r for r in result["history"] if r["loss"] is not None]
        if done:
            say(f"loss: first {done[0]['loss']:.4f} (step {done[0]['step']}) -> "
                f"last {done[-1]['loss']:.4f} (step {done[-1]['step']})")
        if result["checkpoint"] is None and trainer.resumed_from:
            say(f"nothing to do: the run already finished all {trainer.total_steps} steps (raise train.epochs to go on); "
                f"checkpoint: {trainer.resumed_from}")
        else:
            say(f"checkpoint: {result['checkpoint']}")
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
