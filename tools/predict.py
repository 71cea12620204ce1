#!/usr/bin/env python
"""Classify images with a model finetuned by tools/finetune.py; prints the top-k classes by name.

  tools/predict.py runs/finetune photo.jpg other.png           # a run folder: its best.safetensors
  tools/predict.py --checkpoint runs/finetune/last.pth DIR --top-k 3 -o predictions.json
  tools/predict.py runs/finetune DIR --csv predictions.csv

The checkpoint (the first argument or --checkpoint) is a finetuning run folder, its best.safetensors (model
name, class names and image size in the header) or its last.pth. Images: files or folders (searched
recursively); each is resized and centre-cropped as the finetuning evaluation did.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    from mimsparse.cli_args import add_batch_size, add_checkpoint, add_img_size

    p = argparse.ArgumentParser("predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint(p, "finetuning run folder, its best.safetensors or last.pth")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default %(default)s)")
    add_img_size(p, None, "input size (default: the one the model was finetuned at)", type=int)
    add_batch_size(p, 32)
    p.add_argument("--model", default=None, help="timm model name (default: the one the checkpoint names)")
    p.add_argument("-o", "--output", default=None, help="write the predictions as JSON")
    p.add_argument("--csv", default=None, help="write the predictions as CSV (image, rank, class, index, prob)")
    p.add_argument("--device", default="cpu")
    return p


def main(argv=None) -> int:
    from mimsparse.cli_args import resolve_checkpoint

    p = get_args_parser()
    args = p.parse_args(argv)
    if args.checkpoint is not None and args.checkpoint_positional is not None:
        # with --checkpoint, every positional is an image
        args.images.insert(0, args.checkpoint_positional)
        args.checkpoint_positional = None
    resolve_checkpoint(p, args)
    if not args.images:
        p.error("no images given")
    if args.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")

    from mimsparse.train.checkpoint import write_file_atomic
    from mimsparse.evaluate.predict import image_paths, load_classifier, predict

    classifier = load_classifier(args.checkpoint, args.model, args.img_size)
    records = predict(classifier, image_paths(args.images), args.top_k, args.batch_size, args.device)
    print(f"{classifier.name}, {len(classifier.classes)} classes, {classifier.img_size} px, {len(records)} image(s)")
    for r in records:
        if "error" in r:
            print(f"{r['image']}: {r['error']}")
        else:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['prob']:.1%}" for t in r["top"]))
    if args.output:
        write_file_atomic(args.output, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1) + "\n"))
        print(f"wrote {args.output}")
    if args.csv:
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["image", "rank", "class", "index", "prob"])
                for r in records:
                    for rank, t in enumerate(r.get("top", []), 1):
                        w.writerow([r["image"], rank, t["class"], t["index"], f"{t['prob']:.6f}"])
        write_file_atomic(args.csv, write)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
