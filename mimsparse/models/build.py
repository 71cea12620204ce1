"""Builders: config -> encoder (its family from :mod:`mimsparse.models.registry`), masker, and the FCMAE
model that joins them."""
from __future__ import annotations

import torch.nn as nn

from mimsparse.backends import Backend
from mimsparse.config import ConfigError, MaskConfig, ModelConfig, PretrainConfig
from mimsparse.models.fcmae import FCMAE
from mimsparse.models.registry import family_of
from mimsparse.masking import PatchMasker


def build_encoder(cfg: ModelConfig, backend: Backend | str = "dense") -> nn.Module:
    """The sparse encoder ``cfg.name`` names, from its family in the registry. Family-specific
    settings (``use_grn``, ``drop_path`` for ConvNeXt V2) are refused by the families that lack them
    when they would change something."""
    family = family_of(cfg.name)
    return family.encoder.from_name(cfg.name, in_chans=cfg.in_chans, backend=backend, **family.encoder_options(cfg))


def build_masker(cfg: MaskConfig) -> PatchMasker:
    try:
        return PatchMasker(strategy=cfg.strategy, ratio=cfg.ratio, start_ratio=cfg.start_ratio,
                           block_min_patches=cfg.block_min_patches, block_min_aspect=cfg.block_min_aspect,
                           random_fraction=cfg.random_fraction)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"mask: {e}") from None


def build_fcmae(cfg: PretrainConfig, backend: Backend | str = "dense") -> FCMAE:
    masker = build_masker(cfg.mask)
    m = cfg.model
    try:
        return FCMAE(build_encoder(m, backend), decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                     norm_pix_loss=m.norm_pix_loss, masker=masker, decoder=m.decoder,
                     encoder_input=m.encoder_input, loss=m.loss, loss_on=m.loss_on)
    except ValueError as e:
        if str(e).startswith("model."):
            raise ConfigError(str(e)) from None
        raise
