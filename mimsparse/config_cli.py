"""The pretraining config on the command line: MAE's flag names as aliases of config keys, a ``--help``
generated from the config dataclasses, and one precedence rule.

The rule: flags and ``section.key=value`` overrides are applied in the order they are given, on top of
``--config`` (a later one wins, as in the README), so ``--batch-size 2 train.batch_size=3`` trains at 3
and ``train.batch_size=3 --batch-size 2`` at 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from mimsparse.config import PretrainConfig, _merge, parse_override

# flag -> (config key, help); the flags of MAE's main_pretrain.py and timm's train.py
ALIASES = {
    "--model": ("model.name", "encoder: convnextv2_atto ... convnextv2_huge, resnet18|34|50|101"),
    "--epochs": ("train.epochs", "epochs to train"),
    "--blr": ("optim.base_lr", "base learning rate: lr = blr x effective batch / 256"),
    "--lr": ("optim.lr", "absolute peak learning rate (instead of --blr)"),
    "--mask-ratio": ("mask.ratio", "share of patches masked"),
    "--warmup-epochs": ("optim.warmup_epochs", "epochs of linear lr warm-up"),
    "--weight-decay": ("optim.weight_decay", "AdamW weight decay"),
}


def _field(key: str) -> dataclasses.Field:
    section, name = key.split(".")
    return next(f for f in dataclasses.fields(getattr(PretrainConfig(), section)) if f.name == name)


def config_value(text: str):
    """A flag's text as the config value YAML would give it (``64`` -> 64, ``192x320`` stays text)."""
    return parse_override(f"x={text}")["x"] if text else text


class ConfigFlag(argparse.Action):
    """A flag that sets one config key; where it stands among the overrides decides which one wins."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        self.key = key
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def add_config_flag(p: argparse.ArgumentParser, names, key: str, help: str, hidden: bool = False, **kwargs) -> None:
    names = [names] if isinstance(names, str) else list(names)
    default = argparse.SUPPRESS if hidden else None
    p.add_argument(*names, action=ConfigFlag, key=key, default=default,
                   help=argparse.SUPPRESS if hidden else f"{help} (= {key})", **kwargs)


def add_alias_flags(p: argparse.ArgumentParser) -> None:
    for flag, (key, help) in ALIASES.items():
        typ = _field(key).type
        add_config_flag(p, flag, key, help, type={"float": float, "int": int}.get(str(typ), str),
                        metavar=flag.lstrip("-").split("-")[-1].upper())
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (what the run would use) and exit")


def config_keys_help() -> str:
    """Every config key with its default, from the dataclasses (the ``--help`` epilog)."""
    flags = {key: flag for flag, (key, _) in ALIASES.items()}
    lines = ["Config keys (section.key=value; defaults from mimsparse/config.py):"]
    for section, values in PretrainConfig().to_dict().items():
        for name, default in values.items():
            key = f"{section}.{name}"
            flag = f"  [{flags[key]}]" if key in flags else ""
            lines.append(f"  {key} = {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}{flag}")
    return "\n".join(lines)


def ordered_updates(parser: argparse.ArgumentParser, argv=None) -> dict:
    """The nested config updates of the config flags and ``key=value`` overrides in ``argv``, applied
    in command-line order (later wins). ``argv`` has parsed already (argparse refused what it had to)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = {s: a for a in parser._actions for s in a.option_strings}
    updates: dict = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            for rest in argv[i + 1:]:
                updates = _merge(updates, parse_override(rest))
            break
        if token.startswith("-") and len(token) > 1:
            name, eq, inline = token.partition("=")
            action = options.get(name)
            takes_value = action is not None and action.nargs != 0
            if isinstance(action, ConfigFlag):
                text = inline if eq else argv[i + 1]
                if action.type in (int, float):
                    value = action.type(text)
                else:  # a path or a name is text even when it reads like a number
                    value = text if _field(action.key).type == "str" else config_value(text)
                updates = _merge(updates, _nest(action.key, value))
            i += 1 + (takes_value and not eq)
            continue
        if "=" in token:
            updates = _merge(updates, parse_override(token))
        i += 1
    return updates


def _nest(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


def print_config(cfg: PretrainConfig) -> None:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
