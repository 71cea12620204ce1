"""What every conversion needs: the encoder out of a pretraining checkpoint, and the numerical check
that the dense model computes what the sparse encoder computed."""
from __future__ import annotations

from typing import Callable

import torch

from mimsparse.backends.checks import max_rel_error
from mimsparse.errors import ConversionError


def encoder_state_from_checkpoint(ckpt: dict) -> tuple[dict[str, torch.Tensor], str]:
    """(encoder state dict, model name) from a pretraining checkpoint written by mimsparse."""
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ConversionError(
            "not a mimsparse pretraining checkpoint (expected keys 'model' and 'config'); "
            "pass a file written by tools/pretrain.py"
        )
    name = ckpt["config"]["model"]["name"]
    prefix = "encoder."
    sd = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not sd:
        raise ConversionError("checkpoint holds no 'encoder.*' parameters")
    return sd, name


@torch.no_grad()
def conversion_error(encoder, timm_model, img_size: tuple[int, int] = (64, 96), batch: int = 2, seed: int = 0,
                     features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Max relative error between the sparse encoder at mask ratio 0 and the dense model's last
    feature map (``features(x)``, default ``timm_model.forward_features``), both in eval mode, on
    the same random images: max|a - b| / max|b|."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, encoder.in_chans, *img_size, generator=g)
    features = timm_model.forward_features if features is None else features
    encoder_was_training, timm_was_training = encoder.training, timm_model.training
    encoder.eval(), timm_model.eval()
    try:
        ours = encoder(x)
        ref = features(x)
    finally:
        encoder.train(encoder_was_training), timm_model.train(timm_was_training)
    return max_rel_error(ours, ref)
