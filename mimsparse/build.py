"""Builders: config -> model."""
from __future__ import annotations

import torch.nn as nn

from mimsparse.backends import Backend
from mimsparse.config import ConfigError, MaskConfig, ModelConfig, PretrainConfig
from mimsparse.encoder import SparseConvNeXtV2
from mimsparse.fcmae import FCMAE
from mimsparse.masking import PatchMasker

ENCODER_FAMILIES = "convnextv2_atto ... convnextv2_huge (ConvNeXt V2) or resnet18|34|50|101 (ResNet)"


def build_encoder(cfg: ModelConfig, backend: Backend | str = "dense") -> nn.Module:
    """The sparse encoder ``cfg.name`` names: ``convnextv2_*`` -> SparseConvNeXtV2, ``resnet*`` ->
    SparseResNet. ``use_grn`` and ``drop_path`` are ConvNeXt V2 settings: a ResNet has no GRN (the
    default use_grn=true changes nothing there) and no stochastic depth (drop_path > 0 is refused)."""
    name = cfg.name
    if name.startswith("convnextv2_"):
        family, options = SparseConvNeXtV2, {"drop_path_rate": cfg.drop_path, "use_grn": cfg.use_grn}
    elif name.startswith("resnet"):
        if cfg.drop_path > 0:
            raise ConfigError(f"model.drop_path={cfg.drop_path}: stochastic depth is implemented for ConvNeXt V2 only, "
                              f"not for {name}; set model.drop_path=0")
        from mimsparse.resnet import SparseResNet

        family, options = SparseResNet, {}
    else:
        raise ConfigError(f"model.name={name!r} is not a known encoder; choose {ENCODER_FAMILIES}")
    try:
        return family.from_name(name, in_chans=cfg.in_chans, backend=backend, **options)
    except ValueError as e:  # a size the family does not have
        raise ConfigError(f"model.name: {e}") from None


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
