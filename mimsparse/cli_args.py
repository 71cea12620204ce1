"""The command-line convention every tool follows (timm / MAE habits): ``--img-size``, ``--batch-size``,
``--output-dir`` (a run folder) or ``-o/--output`` (one file), and the checkpoint as the first positional
argument or ``--checkpoint``. Older spellings stay accepted as hidden aliases (not in ``--help``), so
existing scripts keep working.
"""
from __future__ import annotations

import argparse

HIDDEN = argparse.SUPPRESS


def _aliases(p: argparse.ArgumentParser, names, dest: str, **kwargs) -> None:
    for name in names:
        p.add_argument(name, dest=dest, default=HIDDEN, help=HIDDEN, **kwargs)


def add_img_size(p, default, help: str, old=("--img",), type=None) -> None:
    """``--img-size`` (``--img`` hidden). ``type=None`` keeps the text (tools that take ``H`` or ``HxW``
    parse it with :func:`mimsparse.visualize.parse_size`, which names a bad value in one line)."""
    kwargs = {"type": type} if type is not None else {}
    p.add_argument("--img-size", default=default, help=help, **kwargs)
    _aliases(p, old, "img_size", **kwargs)


def add_batch_size(p, default: int, help: str = "images per batch (default %(default)s)", old=("--batch",)) -> None:
    p.add_argument("--batch-size", type=int, default=default, help=help)
    _aliases(p, old, "batch_size", type=int)


def add_output_dir(p, default, help: str, old=("--out-dir",)) -> None:
    p.add_argument("--output-dir", default=default, help=help)
    _aliases(p, old, "output_dir")


def add_checkpoint(p, help: str, required: bool = True, many: bool = False, old=("--ckpt",)) -> None:
    """The checkpoint as the first positional argument or ``--checkpoint PATH`` (``--ckpt`` hidden);
    ``many``: one or more (both forms add up). Call :func:`resolve_checkpoint` after parsing."""
    p.add_argument("checkpoint_positional", nargs="*" if many else "?", default=None, metavar="checkpoint",
                   help=help)
    action = "append" if many else "store"
    p.add_argument("--checkpoint", dest="checkpoint", action=action, default=None,
                   help="the same as the positional argument")
    for name in old:
        p.add_argument(name, dest="checkpoint", action=action, default=HIDDEN, help=HIDDEN)
    p.set_defaults(_checkpoint_required=required, _checkpoint_many=many)


def resolve_checkpoint(p: argparse.ArgumentParser, args: argparse.Namespace):
    """Merges the two forms into ``args.checkpoint`` (a list with ``many``) and returns it."""
    positional = args.__dict__.pop("checkpoint_positional", None)
    given = getattr(args, "checkpoint", None)
    if args._checkpoint_many:
        merged = list(positional or []) + list(given or [])
    else:
        if positional is not None and given is not None and positional != given:
            p.error(f"two checkpoints given ({positional!r} and --checkpoint {given!r}); pass one")
        merged = positional if positional is not None else given
    if args._checkpoint_required and not merged:
        p.error("a checkpoint is required: pass it as the first argument or with --checkpoint PATH")
    args.checkpoint = merged
    return merged
