"""Builders: config -> model."""
from __future__ import annotations

from mimsparse.backends import Backend
from mimsparse.config import ModelConfig, PretrainConfig
from mimsparse.encoder import SparseConvNeXtV2
from mimsparse.fcmae import FCMAE


def build_encoder(cfg: ModelConfig, backend: Backend | str = "dense") -> SparseConvNeXtV2:
    return SparseConvNeXtV2.from_name(cfg.name, in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path,
                                      use_grn=cfg.use_grn, backend=backend)


def build_fcmae(cfg: PretrainConfig, backend: Backend | str = "dense") -> FCMAE:
    return FCMAE(build_encoder(cfg.model, backend), decoder_dim=cfg.model.decoder_dim,
                 decoder_depth=cfg.model.decoder_depth, mask_ratio=cfg.mask.ratio,
                 norm_pix_loss=cfg.model.norm_pix_loss)
