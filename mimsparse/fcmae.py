"""FCMAE: mask -> sparse encoder -> dense decoder -> loss on masked patches."""
from __future__ import annotations

import torch
import torch.nn as nn

from mimsparse.decoder import FCMAEDecoder
from mimsparse.encoder import SparseConvNeXtV2
from mimsparse.loss import masked_reconstruction_loss, pixel_targets
from mimsparse.masking import check_image_size, check_mask_ratio, random_patch_mask


class FCMAE(nn.Module):
    def __init__(self, encoder: SparseConvNeXtV2, decoder_dim: int = 512, decoder_depth: int = 1,
                 mask_ratio: float = 0.6, norm_pix_loss: bool = True):
        super().__init__()
        self.encoder = encoder
        self.decoder = FCMAEDecoder(encoder.num_features, encoder.patch_size, encoder.in_chans,
                                    decoder_dim, decoder_depth)
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.norm_pix_loss = norm_pix_loss

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def make_mask(self, images_bchw: torch.Tensor, generator: torch.Generator | None = None,
                  progress: float = 0.0) -> torch.Tensor:
        """bool [B, H/p, W/p], True = visible. ``progress`` in [0, 1] is the fraction of training done."""
        b, _, h, w = images_bchw.shape
        grid = check_image_size(h, w, self.patch_size)
        return random_patch_mask(b, grid, self.mask_ratio, generator, images_bchw.device)

    def forward_encoder(self, images_bchw, visible_bhw):
        return self.encoder(images_bchw, visible_bhw)

    def forward_decoder(self, feats_bchw, visible_bhw):
        """-> predictions [B, L, p*p*C] in patch raster order."""
        pred = self.decoder(feats_bchw, visible_bhw)
        return pred.flatten(2).transpose(1, 2)

    def forward_loss(self, images_bchw, pred_bld, visible_bhw):
        target = pixel_targets(images_bchw, self.patch_size, self.norm_pix_loss)
        return masked_reconstruction_loss(pred_bld, target, visible_bhw.flatten(1))

    def forward(self, images_bchw: torch.Tensor, visible_bhw: torch.Tensor | None = None,
                generator: torch.Generator | None = None):
        """Returns (loss, pred [B, L, p*p*C], visible [B, h, w])."""
        if visible_bhw is None:
            visible_bhw = self.make_mask(images_bchw, generator)
        feats = self.forward_encoder(images_bchw, visible_bhw)
        pred = self.forward_decoder(feats, visible_bhw)
        loss = self.forward_loss(images_bchw, pred, visible_bhw)
        return loss, pred, visible_bhw
