"""One mechanism for every state-dict layout change: a table of exact key templates, read both ways.

A row is ``(our key, their key, layout)``: templates such as ``stages.{s}.blocks.{b}.norm.{wb}``, and
a layout, a pair of functions (ours -> theirs, theirs -> ours) for tensors stored in another shape.
Each table is written once and used in both directions, so import and export cannot drift apart.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from mimsparse.errors import ConversionError

Layout = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
SAME: Layout = (lambda t: t, lambda t: t)

# Template fields: {s} stage, {b} block, {d} decoder block, {wb} weight|bias.
_FIELDS = {"s": r"\d+", "b": r"\d+", "d": r"\d+", "wb": r"weight|bias"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for i, p in enumerate(parts))
    return re.compile(f"^{regex}$")


def convert_keys(sd: dict[str, torch.Tensor], table, to_theirs: bool, what: str,
                 unexpected: str = "unexpected parameter {key!r} for the {what}",
                 leftover: dict | None = None) -> dict[str, torch.Tensor]:
    """Rename (and reshape) every entry of ``sd`` by ``table``; a key no row matches is an error
    (``unexpected``, formatted with the key and ``what`` the table describes), or, when a ``leftover``
    dict is given, goes there unchanged (for a caller that reports every misfit at once)."""
    src, dst = (0, 1) if to_theirs else (1, 0)
    rules = [(_pattern(row[src]), row[dst], row[2][0 if to_theirs else 1]) for row in table]
    out = {}
    for key, value in sd.items():
        for pattern, target, layout in rules:
            match = pattern.match(key)
            if match:
                out[target.format(**match.groupdict())] = layout(value).contiguous()
                break
        else:
            if leftover is None:
                raise ConversionError(unexpected.format(key=key, what=what))
            leftover[key] = value
    return out


def check_encoder_entries(sd: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], expected: set[str],
                          target: str) -> None:
    """``sd`` must hold exactly the ``expected`` keys of the dense ``reference`` state dict, with its shapes."""
    missing, extra = expected - sd.keys(), sd.keys() - expected
    if missing or extra:
        raise ConversionError(f"encoder does not match {target}: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(extra)[:5]}")
    for k, v in sd.items():
        if v.shape != reference[k].shape:
            raise ConversionError(f"{k}: shape {tuple(v.shape)} does not match {target} {tuple(reference[k].shape)}")
