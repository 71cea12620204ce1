"""Sparse encoder <-> timm ``convnextv2_*`` state dicts; ``convert_checkpoint`` also takes ResNet
checkpoints (``resnet*``, see ``mimsparse.convert_resnet``: torchvision and timm keys alike).

Our parameter names already follow timm's except the stem and the downsample layers; the conv-MLP
sizes (atto..nano) store the MLP as 1x1 convs, so Linear weights get a reshape.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from mimsparse.errors import ConversionError
from mimsparse.models import get_spec
from mimsparse.resnet import RESNET_ARCHS

# (our name, timm name) as exact-match regexes.
_TO_TIMM = [
    (r"^stem_conv\.(weight|bias)$", r"stem.0.\1"),
    (r"^stem_norm\.(weight|bias)$", r"stem.1.\1"),
    (r"^stages\.(\d+)\.downsample\.norm\.(weight|bias)$", r"stages.\1.downsample.0.\2"),
    (r"^stages\.(\d+)\.downsample\.conv\.(weight|bias)$", r"stages.\1.downsample.1.\2"),
    (r"^(stages\.\d+\.blocks\.\d+\.(?:conv_dw|norm|mlp\.fc1|mlp\.grn|mlp\.fc2)\.(?:weight|bias))$", r"\1"),
]
_FROM_TIMM = [
    (r"^stem\.0\.(weight|bias)$", r"stem_conv.\1"),
    (r"^stem\.1\.(weight|bias)$", r"stem_norm.\1"),
    (r"^stages\.(\d+)\.downsample\.0\.(weight|bias)$", r"stages.\1.downsample.norm.\2"),
    (r"^stages\.(\d+)\.downsample\.1\.(weight|bias)$", r"stages.\1.downsample.conv.\2"),
    (r"^(stages\.\d+\.blocks\.\d+\.(?:conv_dw|norm|mlp\.fc1|mlp\.grn|mlp\.fc2)\.(?:weight|bias))$", r"\1"),
]


def _rename(key: str, table) -> str | None:
    for pattern, repl in table:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _is_mlp_linear(key: str) -> bool:
    return re.search(r"\.mlp\.fc[12]\.weight$", key) is not None


def encoder_to_timm(encoder_sd: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> timm ``model_name`` state dict without the classifier head."""
    conv_mlp = get_spec(model_name).conv_mlp
    out = {}
    for key, value in encoder_sd.items():
        new = _rename(key, _TO_TIMM)
        if new is None:
            raise ConversionError(f"unexpected encoder parameter {key!r}: not part of a ConvNeXt V2 encoder")
        if conv_mlp and _is_mlp_linear(key):
            value = value[:, :, None, None]
        out[new] = value
    return out


def timm_to_encoder(timm_sd: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """timm ``model_name`` state dict -> our encoder state dict (the head is dropped)."""
    conv_mlp = get_spec(model_name).conv_mlp
    out = {}
    for key, value in timm_sd.items():
        if key.startswith("head.") or key.startswith("norm_pre."):
            continue
        new = _rename(key, _FROM_TIMM)
        if new is None:
            raise ConversionError(f"unexpected timm parameter {key!r} for {model_name}")
        if conv_mlp and _is_mlp_linear(new):
            value = value.flatten(1)
        out[new] = value
    return out


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


def to_timm_model_state(encoder_sd: dict[str, torch.Tensor], model_name: str, num_classes: int = 1000,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete state dict that ``timm.create_model(model_name, num_classes=N)`` loads with
    strict=True: the converted encoder plus a freshly initialised head (final norm + classifier)."""
    import timm

    torch.manual_seed(seed)
    fresh = timm.create_model(model_name, num_classes=num_classes).state_dict()
    sd = encoder_to_timm(encoder_sd, model_name)
    expected = {k for k in fresh if not k.startswith("head.")}
    if not any(".mlp.grn." in k for k in sd):
        # Encoder pretrained with model.use_grn=false: timm's GRN computes x + weight * (x * Nx) + bias,
        # the identity when both are zero, so zero GRN parameters reproduce the GRN-free blocks exactly.
        sd.update({k: torch.zeros_like(fresh[k]) for k in expected - sd.keys() if ".mlp.grn." in k})
    check_encoder_entries(sd, fresh, expected, f"timm {model_name}")
    sd.update({k: v for k, v in fresh.items() if k.startswith("head.")})
    return {k: sd[k].detach().clone().contiguous() for k in fresh}


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
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def convert_checkpoint(ckpt: dict, num_classes: int = 1000, verify: bool = True, tolerance: float = 1e-4):
    """Pretraining checkpoint -> (dense state dict, model name, max relative error or None).

    ``convnextv2_*``: a timm state dict. ``resnet*``: a state dict that torchvision's and timm's
    ResNet both load (``mimsparse.convert_resnet``). With ``verify`` the converted dense model is
    compared to the sparse encoder at mask ratio 0 and a ConversionError is raised above ``tolerance``.
    """
    import timm

    from mimsparse.build import build_encoder
    from mimsparse.config import config_from_dict

    encoder_sd, name = encoder_state_from_checkpoint(ckpt)
    if name in RESNET_ARCHS:
        from mimsparse.convert_resnet import convert_resnet  # it imports this module

        sd, error = convert_resnet(encoder_sd, name, num_classes, verify, tolerance)
        return sd, name, error
    timm_sd = to_timm_model_state(encoder_sd, name, num_classes)
    error = None
    if verify:
        cfg = config_from_dict(ckpt["config"])
        encoder = build_encoder(cfg.model, "dense")
        encoder.load_state_dict(encoder_sd, strict=True)
        model = timm.create_model(name, num_classes=num_classes)
        model.load_state_dict(timm_sd, strict=True)
        error = conversion_error(encoder, model)
        if not error <= tolerance:
            raise ConversionError(f"converted model differs from the sparse encoder: max relative error {error:.3g} > {tolerance}")
    return timm_sd, name, error
