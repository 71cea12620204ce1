"""ConvNeXt V2 in Hugging Face transformers' layout (``ConvNextV2Model`` and
``ConvNextV2ForImageClassification``, the ``facebook/convnextv2-*`` repositories of the Hub) <-> our
encoder, through one table of exact key templates read both ways.

transformers names the blocks ``layers`` and their parts ``dwconv``, ``layernorm``, ``pwconv1``,
``grn``, ``pwconv2`` (the MLP as ``nn.Linear``, like ours, for every size), keeps GRN's parameters as
``[1, 1, 1, C]``, and puts the stem under ``embeddings`` and each stage's downsampling (LayerNorm,
then the 2x2 stride-2 conv) under ``downsampling_layer``. ``convnextv2.layernorm`` (the norm after
pooling) and ``classifier`` are the classification head.
"""
from __future__ import annotations

import torch

from mimsparse.models.keymap import SAME, Layout, convert_keys

MARKER = "convnextv2.embeddings.patch_embeddings.weight"  # a key only this layout has
HEAD = ("convnextv2.layernorm.", "classifier.")
_GRN: Layout = (lambda t: t.reshape(1, 1, 1, -1), lambda t: t.flatten())
_LAYER = "convnextv2.encoder.stages.{s}.layers.{b}."
TABLE = [
    ("stem_conv.{wb}", "convnextv2.embeddings.patch_embeddings.{wb}", SAME),
    ("stem_norm.{wb}", "convnextv2.embeddings.layernorm.{wb}", SAME),
    ("stages.{s}.downsample.norm.{wb}", "convnextv2.encoder.stages.{s}.downsampling_layer.0.{wb}", SAME),
    ("stages.{s}.downsample.conv.{wb}", "convnextv2.encoder.stages.{s}.downsampling_layer.1.{wb}", SAME),
    ("stages.{s}.blocks.{b}.conv_dw.{wb}", _LAYER + "dwconv.{wb}", SAME),
    ("stages.{s}.blocks.{b}.norm.{wb}", _LAYER + "layernorm.{wb}", SAME),
    ("stages.{s}.blocks.{b}.mlp.fc1.{wb}", _LAYER + "pwconv1.{wb}", SAME),
    ("stages.{s}.blocks.{b}.mlp.grn.{wb}", _LAYER + "grn.{wb}", _GRN),
    ("stages.{s}.blocks.{b}.mlp.fc2.{wb}", _LAYER + "pwconv2.{wb}", SAME),
]


def is_transformers_convnextv2(sd: dict) -> bool:
    return MARKER in sd


def encoder_from_transformers(sd: dict[str, torch.Tensor], leftover: dict) -> tuple[dict, list[str]]:
    """(our encoder entries, the head's keys) of a transformers ConvNeXt V2 state dict; entries no row
    matches go to ``leftover`` (the caller names every misfit at once)."""
    head = sorted(k for k in sd if k.startswith(HEAD))
    body = {k: v for k, v in sd.items() if not k.startswith(HEAD)}
    return convert_keys(body, TABLE, False, "transformers ConvNeXt V2", leftover=leftover), head


def encoder_to_transformers(encoder_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> transformers' ``ConvNextV2Model`` layout without the pooled norm."""
    return convert_keys(encoder_sd, TABLE, True, "ConvNeXt V2 encoder",
                        unexpected="unexpected encoder parameter {key!r}: not part of a {what}")
