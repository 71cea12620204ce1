"""Builders: config -> model."""
from __future__ import annotations

from mimsparse.backends import Backend
from mimsparse.config import ConfigError, MaskConfig, ModelConfig, PretrainConfig
from mimsparse.encoder import SparseConvNeXtV2
from mimsparse.fcmae import FCMAE
from mimsparse.masking import PatchMasker


def build_encoder(cfg: ModelConfig, backend: Backend | str = "dense") -> SparseConvNeXtV2:
    return SparseConvNeXtV2.from_name(cfg.name, in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path,
                                      use_grn=cfg.use_grn, backend=backend)


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
