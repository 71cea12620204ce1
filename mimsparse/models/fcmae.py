"""Masked image modeling model: mask -> sparse encoder -> decoder -> loss.

The defaults are FCMAE (ConvNeXt V2). The objective's parts are options, so the same class also
runs SimMIM's recipe (learned mask token at the encoder input, linear head, L1 loss) and SparK's
(every encoder stage densified with a mask token per scale, a light UNet decoder to full resolution):

| option        | FCMAE / MAE (default)              | SimMIM                          | SparK                       |
|---------------|------------------------------------|---------------------------------|-----------------------------|
| encoder_input | ``sparse``: masked patches removed | ``mask_token``: a learned token | ``sparse``                  |
| decoder       | ``fcmae``                          | ``linear`` (one 1x1 conv)       | ``spark`` (all four stages) |
| loss          | ``mse``                            | ``l1``                          | ``mse``                     |
| loss_on       | ``masked``                         | ``masked``                      | ``masked``                  |
| norm_pix_loss | True                               | False                           | True                        |

``encoder_input="masked_image_dense"`` is an ablation, not a method: the papers' "naive dense"
baseline (ConvNeXt V2 Table 1, SparK Sec. 3.1). Masked patches are zeroed once in the image and the
same encoder then runs as a plain dense network over every site (no re-masking after each op), so
convolutions carry information out of masked regions, LN/GRN statistics include masked sites and the
mask pattern blurs stage by stage. The decoder still replaces masked sites by its mask token.

The encoder is any module with ``patch_size``, ``in_chans``, ``num_features``, ``stage_dims``,
``stage_strides``, ``forward(images, visible)`` (last stage's dense map) and
``forward_hierarchical(images, visible)`` (every stage's, finest first): SparseConvNeXtV2 or
SparseResNet.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mimsparse.models.decoders import DECODERS, build_decoder
from mimsparse.errors import ConfigError
from mimsparse.models.loss import LOSS_ON, LOSSES, pixel_targets, reconstruction_loss
from mimsparse.masking import PatchMasker, num_masked, upsample_mask

ENCODER_INPUTS = ("sparse", "mask_token", "masked_image_dense")


class FCMAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder_dim: int = 512, decoder_depth: int = 1,
                 mask_ratio: float | None = None, norm_pix_loss: bool = True, masker: PatchMasker | None = None,
                 decoder: str = "fcmae", encoder_input: str = "sparse", loss: str = "mse", loss_on: str = "masked"):
        """``masker`` chooses the mask strategy (default: random at ``mask_ratio``, 0.6 if not given);
        give one of the two. The other options select the objective (see the module docstring)."""
        super().__init__()
        if masker is not None and mask_ratio is not None:
            raise ValueError("give the mask ratio either as mask_ratio or inside masker, not both")
        self.masker = masker if masker is not None else PatchMasker(ratio=0.6 if mask_ratio is None else mask_ratio)
        check_objective(decoder, encoder_input, loss, loss_on)
        self.encoder = encoder
        self.decoder = build_decoder(decoder, encoder, decoder_dim, decoder_depth)
        self.input_mask_token = None
        if encoder_input == "mask_token":
            # A learned s x s pixel patch tiled over the masked patches, s = the first stage's stride (ConvNeXt's
            # k4 s4 stem): every masked site of that stage sees the same pixels (with an overlapping stem such as
            # ResNet's, away from the patch borders), so it gets one learned embedding. SimMIM adds its token right
            # after the patch embedding; entering through the stem, ours spans at most in_chans * s^2 (48) dimensions.
            s = encoder.stage_strides[0]
            self.input_mask_token = nn.Parameter(torch.zeros(1, encoder.in_chans, s, s))
            nn.init.trunc_normal_(self.input_mask_token, std=0.02)
        self.encoder_input = encoder_input
        self.loss, self.loss_on, self.norm_pix_loss = loss, loss_on, norm_pix_loss

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def mask_ratio(self) -> float:
        return self.masker.ratio

    def make_mask(self, images_bchw: torch.Tensor, generator: torch.Generator | None = None,
                  progress: float = 0.0) -> torch.Tensor:
        """bool [B, H/p, W/p], True = visible. ``progress`` in [0, 1] is the fraction of training done."""
        return self.masker(images_bchw, self.patch_size, generator, progress)

    def visible_count(self, grid_hw: tuple[int, int], progress: float = 0.0) -> int:
        """Visible patches per sample in every mask :meth:`make_mask` draws (all strategies mask exactly
        round(r * L) patches; progressive's r depends on ``progress``)."""
        length = grid_hw[0] * grid_hw[1]
        return length - num_masked(self.masker.ratio_at(progress), length)

    def forward_encoder(self, images_bchw, visible_bhw, num_visible: int | None = None):
        """-> what the decoder reads: the last stage's features [B, C, H/p, W/p] or, for a hierarchical
        decoder, every stage's [B, C_i, H/s_i, W/s_i], finest first. With a sparse input they are zero
        at masked patches (the leaky ``masked_image_dense`` input: not zero there). ``num_visible``: see
        :meth:`forward`."""
        encode = self.encoder.forward_hierarchical if self.decoder.hierarchical else self.encoder
        if self.encoder_input == "sparse":
            return encode(images_bchw, visible_bhw, num_visible=num_visible)
        # Dense inputs: every site is active (visible=None), so each backend computes the plain dense network;
        # a static caller's count is then all of them (else packed's general mode would sync on the GPU).
        all_sites = None if num_visible is None else visible_bhw[0].numel()
        if self.encoder_input == "mask_token":
            return encode(self.fill_masked(images_bchw, visible_bhw), None, num_visible=all_sites)
        return encode(self.zero_masked(images_bchw, visible_bhw), None, num_visible=all_sites)

    def zero_masked(self, images_bchw, visible_bhw):
        """Images with every masked patch set to zero, once (the leaky dense ablation's input)."""
        keep = upsample_mask(visible_bhw, self.patch_size).unsqueeze(1)
        return images_bchw * keep.to(images_bchw.dtype)

    def fill_masked(self, images_bchw, visible_bhw):
        """Images with every masked patch showing the tiled input mask token (SimMIM's encoder input)."""
        _, _, h, w = images_bchw.shape
        s = self.encoder.stage_strides[0]
        token = self.input_mask_token.to(images_bchw.dtype).repeat(1, 1, h // s, w // s)
        keep = upsample_mask(visible_bhw, self.patch_size).unsqueeze(1)
        return torch.where(keep, images_bchw, token)

    def forward_decoder(self, feats, visible_bhw):
        """feats: as :meth:`forward_encoder` returns. -> predictions [B, L, p*p*C] in patch raster order."""
        pred = self.decoder(feats, visible_bhw)
        return pred.flatten(2).transpose(1, 2)

    def forward_loss(self, images_bchw, pred_bld, visible_bhw):
        target = pixel_targets(images_bchw, self.patch_size, self.norm_pix_loss)
        return reconstruction_loss(pred_bld, target, visible_bhw.flatten(1), self.loss, self.loss_on)

    def forward(self, images_bchw: torch.Tensor, visible_bhw: torch.Tensor | None = None,
                generator: torch.Generator | None = None, num_visible: int | None = None):
        """Returns (loss, pred [B, L, p*p*C], visible [B, h, w]).

        ``num_visible``: the visible patches per sample when the caller knows every sample has that many
        (:meth:`visible_count`); the packed backend then builds its indices without host syncs and with
        static shapes, so ``torch.compile(fullgraph=True)`` takes the whole step. A mask with another count
        raises a device-side error."""
        if visible_bhw is None:
            visible_bhw = self.make_mask(images_bchw, generator)
        feats = self.forward_encoder(images_bchw, visible_bhw, num_visible)
        pred = self.forward_decoder(feats, visible_bhw)
        loss = self.forward_loss(images_bchw, pred, visible_bhw)
        return loss, pred, visible_bhw


def check_objective(decoder: str, encoder_input: str, loss: str, loss_on: str) -> None:
    """Refuse unknown values and the one combination that cannot learn (by config key)."""
    for key, value, allowed in (("model.decoder", decoder, DECODERS),
                                ("model.encoder_input", encoder_input, ENCODER_INPUTS),
                                ("model.loss", loss, LOSSES), ("model.loss_on", loss_on, LOSS_ON)):
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if decoder == "linear" and encoder_input == "sparse":
        raise ConfigError(
            "model.decoder=linear needs model.encoder_input=mask_token: a sparse encoder computes nothing at "
            "masked patches and a 1x1 head has no spatial mixing, so it would predict one constant there. "
            "Use model.encoder_input=mask_token (SimMIM) or model.decoder=fcmae")
    if decoder == "spark" and encoder_input == "mask_token":
        raise ConfigError(
            "model.decoder=spark needs model.encoder_input=sparse: the spark decoder puts its own mask token at "
            "every masked site of every stage, so whatever the encoder computed there from an input mask token "
            "would be discarded (and SparK's point is an encoder that never sees masked patches). "
            "Use model.encoder_input=sparse (SparK) or model.decoder=fcmae|linear")
