#!/usr/bin/env python
"""Finetune a dense timm classifier (ConvNeXt V2 recipe, scaled down) on labelled images and report
top-1 on the test split after every epoch.

  tools/finetune.py --checkpoint runs/fcmae_atto/checkpoint-0000160.pth --data lfw-subset --img-size 64
  tools/finetune.py --checkpoint atto-timm.pth --model convnextv2_atto --data fashion-mnist --img-size 64 --label-fraction 0.1
  tools/finetune.py --checkpoint random --model convnextv2_atto --data DIR          # the baseline
  tools/launch.py --standalone --nproc-per-node 8 tools/finetune.py ...   # DDP (or torchrun); --batch-size per process

--checkpoint (or the first argument; --ckpt still works): a checkpoint of tools/pretrain.py (converted on the
fly; names its model), a timm state dict (tools/convert_to_dense.py; a bare .pth needs --model; a classifier
of another size is replaced), a timm model folder, a Hugging Face transformers ConvNeXt V2 folder, or "random".
--eval: only evaluate a finetuned classifier (a run folder, best.safetensors, best-ema.safetensors or last.pth).
--data: an ImageFolder (DIR/<class>/<image>, or DIR/train/... and DIR/test/...), or fashion-mnist,
lfw-subset, foolbox-imagenet. Writes <output-dir>/log.jsonl (one line per epoch), results.json, last.pth (for
--resume) and best.safetensors (best-ema.safetensors with --model-ema), a plain timm state dict with the class
names in its header:
timm.create_model(model, num_classes=N).load_state_dict(safetensors.torch.load_file(p)); tools/predict.py reads it.
"""
from __future__ import annotations

import argparse
import sys


def get_args_parser() -> argparse.ArgumentParser:
    from mimsparse.evaluate.finetune import weights_and_data_args
    from mimsparse.train.stop_signal import DEFAULT_SIGNALS

    p = argparse.ArgumentParser("finetune", description=__doc__, parents=[weights_and_data_args()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/finetune",
                   help="log.jsonl, results.json, last.pth, best.safetensors (default %(default)s)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="train on this fraction of the labelled "
                   "training images, per class, drawn from --seed (e.g. 0.1; default %(default)s)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine, per step")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (overrides --blr)")
    p.add_argument("--blr", type=float, default=1e-3, help="base learning rate: without --lr, lr = blr x batch size "
                   "/ 256 (default %(default)s)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="lr at the end of the cosine")
    p.add_argument("--layer-decay", type=float, default=0.9, help="layer-wise lr decay: lr x decay^(depth of the head "
                   "- depth of the layer), depth from timm's group_matcher (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on norms and biases)")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    p.add_argument("--head-init-scale", type=float, default=0.001, help="scale of a fresh classifier's initial "
                   "weights (ConvNeXt V2: 0.001)")
    p.add_argument("--seed", type=int, default=0, help="head init, label subset, order, augmentation, drop path")
    p.add_argument("--resume", default=None, metavar="auto|PATH", help="continue from <output-dir>/last.pth (auto) "
                   "or PATH: weights, optimizer, epoch, RNGs; a larger --epochs extends a finished run, its schedule "
                   "recomputed for the new length")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an output dir that holds another "
                   "run's files, deleting them (without it such a start is refused)")
    p.add_argument("--stop-signals", default=DEFAULT_SIGNALS, help="signals that stop the run after the step in "
                   "progress, with last.pth at that step; the exit status is then 75 (default %(default)s; '' = none)")
    p.add_argument("--save-every-steps", type=int, default=0, help="also write last.pth every N steps within an "
                   "epoch, so a kill without a signal (OOM killer, lost node) loses at most N steps (0 = at epoch "
                   "ends only; default %(default)s)")
    p.add_argument("--save-every-minutes", type=float, default=0.0, help="the same every M minutes (rank 0's clock; "
                   "0 = off; default %(default)s)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke tests); the "
                   "schedule still spans --epochs")
    p.add_argument("--eval", action="store_true", help="only evaluate a finetuned classifier (--checkpoint: "
                   "a run folder, its best.safetensors or last.pth) on --data's test (or held-out) split; trains "
                   "and writes nothing")
    p.add_argument("--accum-iter", type=int, default=1, help="micro-batches of --batch-size per optimizer step "
                   "(gradient accumulation: the global batch, and the lr it scales, is batch x processes x this; "
                   "default %(default)s)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast precision for the "
                   "forward pass (fp16: CUDA, with loss scaling; bf16: CUDA and CPU; default %(default)s)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0 = no clipping; "
                   "default %(default)s)")
    p.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights "
                   "(timm's ModelEmaV3), evaluate it every epoch and save its best as best-ema.safetensors")
    p.add_argument("--model-ema-decay", type=float, default=0.9999, help="its decay per step (default %(default)s)")
    p.add_argument("--log-every", type=int, default=20, help="without a progress bar (output not a terminal, or "
                   "--no-progress), a plain line every N steps: loss, lr, images/s, ETA (0 = none; default "
                   "%(default)s)")
    return p


def main(argv=None) -> int:
    from mimsparse.cli import share_cores_between_processes
    from mimsparse.cli_args import resolve_checkpoint

    p = get_args_parser()
    args = p.parse_args(argv)
    resolve_checkpoint(p, args)
    share_cores_between_processes()
    from mimsparse.evaluate.finetune import evaluate_only, main as finetune

    from mimsparse.train import distributed
    from mimsparse.train.stop_signal import stopped_with_checkpoint

    _, args.device = distributed.init_from_env(args.device)  # torchrun: gloo on CPU, nccl and cuda:LOCAL_RANK on CUDA
    try:
        results = evaluate_only(args) if args.eval else finetune(args)
    finally:
        distributed.cleanup()
    return stopped_with_checkpoint() if results["stopped_by"] else 0  # 75: requeue, then --resume auto


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
