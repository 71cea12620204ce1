#!/usr/bin/env python
"""Checkpoints of the official ConvNeXt-V2 code (facebookresearch/ConvNeXt-V2) <-> mimsparse.

import: an official FCMAE pretraining checkpoint -> a mimsparse run folder that any backend resumes
  tools/convert_official.py import OFFICIAL.pth --output-dir runs/from_official [--config YAML] [key=value ...]
  tools/pretrain.py --config runs/from_official/config.yaml --resume auto --backend packed

export: a mimsparse pretraining checkpoint -> the official layouts
  tools/convert_official.py export CHECKPOINT.pth -o fcmae.pth
      FCMAE layout: for main_pretrain.py --resume and main_finetune.py --finetune
  tools/convert_official.py export CHECKPOINT.pth -o dense.pth --dense [--num-classes N]
      ConvNeXtV2 layout (models/convnextv2.py), with a fresh classifier when N is given
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def import_official(args) -> int:
    import yaml

    from mimsparse.train.checkpoint import write_text_atomic
    from mimsparse.config import config_from_dict, load_updates
    from mimsparse.train.engine import Pretrainer
    from mimsparse.errors import OutputError
    from mimsparse.convert.official import fcmae_from_official, import_config, load_official_checkpoint, official_config

    official_sd, official_args = load_official_checkpoint(args.checkpoint)
    overrides = list(args.overrides) + [f"train.output_dir={args.output_dir}"]
    if args.data:
        overrides.append(f"data.path={args.data}")
    user = load_updates(args.config, overrides)
    config_from_dict(user)  # the user's own values are checked by key first
    # the architecture comes from the checkpoint; mask.ratio / norm_pix_loss from its args unless given
    updates, notes = import_config(user, official_config(official_sd, official_args))
    cfg = config_from_dict(updates)
    # the folder is held (locked) and guarded like a pretraining run's (mimsparse.train.run_folder)
    trainer = Pretrainer(cfg, "dense", "cpu", show_progress=False, overwrite=args.overwrite)
    try:
        trainer.model.load_state_dict(fcmae_from_official(official_sd), strict=True)
        path = trainer.save()
    except BaseException:
        trainer.folder.abandon()  # nothing was imported: no folder left behind that this start created
        raise
    config_path = Path(args.output_dir) / "config.yaml"
    try:
        write_text_atomic(config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as e:
        raise OutputError(f"cannot write {str(config_path)!r} ({e.strerror or e}); {path} was written") from e
    finally:
        trainer.folder.release()
    m = cfg.model
    print(f"imported {args.checkpoint}: {m.name}, decoder {m.decoder_dim}x{m.decoder_depth}, "
          f"mask ratio {cfg.mask.ratio}, norm_pix_loss {m.norm_pix_loss} ({len(official_sd)} tensors)")
    for note in notes:
        print(f"  {note}")
    print(f"wrote {path} and {config_path}; continue with:\n"
          f"  tools/pretrain.py --config {config_path} --resume auto --backend BACKEND")
    return 0


def export_official(args) -> int:
    from mimsparse.train.checkpoint import load_checkpoint, require_training_checkpoint, save_checkpoint
    from mimsparse.convert import encoder_state_from_checkpoint
    from mimsparse.errors import ConfigError
    from mimsparse.convert.official import encoder_to_official_dense, fcmae_to_official

    ckpt = load_checkpoint(args.checkpoint)
    require_training_checkpoint(ckpt, args.checkpoint)
    out = Path(args.output)
    if args.dense:
        encoder_sd, name = encoder_state_from_checkpoint(ckpt)
        sd = encoder_to_official_dense(encoder_sd, args.num_classes)
        head = f"fresh {args.num_classes}-class head" if args.num_classes is not None else "no head"
        what = f"official ConvNeXtV2 ({name}, {head})"
        strict = "" if args.num_classes is not None else ", strict=False)  # no norm/head: the classifier stays fresh"
        build = f"{name}(num_classes={args.num_classes})" if args.num_classes is not None else f"{name}()"
        load = (f"from models.convnextv2 import {name}; model = {build}; "
                f"model.load_state_dict(torch.load('{out}', weights_only=True)['model']{strict or ')'}")
    else:
        if args.num_classes is not None:
            raise ConfigError("--num-classes goes with --dense (the FCMAE layout has no classifier)")
        sd = fcmae_to_official(ckpt["model"])
        what = "official FCMAE"
        m = ckpt["config"]["model"]
        load = (f"from models.fcmae import {m['name']}; model = {m['name']}(decoder_depth={m['decoder_depth']}, "
                f"decoder_embed_dim={m['decoder_dim']}, norm_pix_loss={m['norm_pix_loss']}); "
                f"model.load_state_dict(torch.load('{out}', weights_only=True)['model'])")
    save_checkpoint({"model": sd}, out)  # atomic; a full disk or a folder in the way is one line naming out
    print(f"wrote {out}: {what} layout, {len(sd)} tensors, wrapped as {{'model': state_dict}}: under the key 'model' "
          f"(as the official code saves)")
    print(f"load with: {load}")
    if args.dense and args.num_classes:  # timm's convnextv2 checkpoint_filter_fn reads the official layout
        print(f"       or: timm.create_model('{name}', pretrained=True, num_classes={args.num_classes}, "
              f"pretrained_cfg_overlay=dict(file='{out}', num_classes={args.num_classes}))")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="official FCMAE checkpoint -> mimsparse run folder")
    from mimsparse.cli_args import add_checkpoint, resolve_checkpoint

    add_checkpoint(imp, "file saved by the official main_pretrain.py (or its 'model' state dict)")
    imp.add_argument("--output-dir", required=True, help="run folder to create (= train.output_dir)")
    imp.add_argument("--config", default=None,
                     help="YAML for the training settings; the architecture comes from the checkpoint")
    imp.add_argument("--data", default=None, help="ImageFolder or flat folder (default: bundled photos)")
    imp.add_argument("--overwrite", action="store_true",
                     help="import into an output dir that holds another run's checkpoints, deleting them")
    imp.epilog = ("Config overrides section.key=value may follow, e.g. train.epochs=5 optim.base_lr=1e-4. The "
                  "architecture always comes from the checkpoint's shapes; mask.ratio and model.norm_pix_loss come "
                  "from its saved args unless given here. Each decision is printed.")
    exp = sub.add_parser("export", help="mimsparse checkpoint -> official layout")
    add_checkpoint(exp, "checkpoint written by tools/pretrain.py")
    exp.add_argument("-o", "--output", required=True, help="a .pth holding {'model': state_dict} (the official "
                     "code's wrapped form)")
    exp.add_argument("--dense", action="store_true", help="official ConvNeXtV2 (fine-tuning model) layout")
    exp.add_argument("--num-classes", type=int, default=None, help="with --dense: add a fresh classifier of N classes")
    # config overrides (section.key=value) may follow the options, which argparse's subcommands do not allow
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad or (rest and args.command != "import"):
        p.error(f"unrecognized arguments: {' '.join(bad or rest)}")
    args.overrides = rest
    resolve_checkpoint(imp if args.command == "import" else exp, args)
    return import_official(args) if args.command == "import" else export_official(args)


if __name__ == "__main__":
    from mimsparse.cli import run_cli

    sys.exit(run_cli(main))
