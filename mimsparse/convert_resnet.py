"""Sparse ResNet encoder -> dense torchvision / timm ``resnet*`` state dicts.

``SparseResNet`` names its parameters and buffers as torchvision does, and timm's ResNet uses the
same keys with the same shapes (in the same order) for resnet18/34/50/101; tests/test_resnet.py
checks both. So one state dict loads with ``strict=True`` into ``torchvision.models.resnet50(
num_classes=N)`` and into ``timm.create_model("resnet50", num_classes=N)`` alike: there is no
torchvision-vs-timm format to choose. The conversion is the identity on the encoder's entries
(BatchNorm running statistics and ``num_batches_tracked`` included) plus a fresh ``fc``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mimsparse.convert import ConversionError, check_encoder_entries, conversion_error
from mimsparse.resnet import RESNET_ARCHS, SparseResNet


def resnet_model_state(encoder_sd: dict[str, torch.Tensor], model_name: str, num_classes: int = 1000,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete state dict for ``model_name`` with ``num_classes`` outputs: the encoder's entries
    plus a freshly initialised ``fc`` (nn.Linear's default init, as in both libraries).
    Keys and shapes are checked against timm's model (built on the meta device: no init cost)."""
    import timm

    if model_name not in RESNET_ARCHS:
        raise ConversionError(f"unknown ResNet {model_name!r}; available: {', '.join(RESNET_ARCHS)}")
    if "conv1.weight" not in encoder_sd:
        raise ConversionError(f"not a {model_name} encoder: no 'conv1.weight' among its entries")
    in_chans = encoder_sd["conv1.weight"].shape[1]
    with torch.device("meta"):
        ref = timm.create_model(model_name, num_classes=num_classes, in_chans=in_chans).state_dict()
    check_encoder_entries(encoder_sd, ref, {k for k in ref if not k.startswith("fc.")}, model_name)
    sd = dict(encoder_sd)
    if "fc.weight" in ref:  # timm's num_classes=0 has no classifier
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fc = nn.Linear(*reversed(ref["fc.weight"].shape))
        sd.update({"fc.weight": fc.weight, "fc.bias": fc.bias})
    return {k: sd[k].detach().clone().contiguous() for k in ref}


def torchvision_features(model, x_bchw: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet's last feature map [B, C, H/32, W/32] (timm's ``forward_features``)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x_bchw))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
    return x


def convert_resnet(encoder_sd: dict[str, torch.Tensor], model_name: str, num_classes: int = 1000,
                   verify: bool = True, tolerance: float = 1e-4) -> tuple[dict[str, torch.Tensor], float | None]:
    """Encoder state dict -> (dense state dict, max relative error or None).

    With ``verify`` the sparse encoder (mask ratio 0, eval mode) is compared with timm's model and
    (for 3 input channels and a classifier, which torchvision's ResNet always has) torchvision's,
    both loaded strictly from the result; above ``tolerance`` a ConversionError is raised."""
    import timm
    import torchvision

    sd = resnet_model_state(encoder_sd, model_name, num_classes)
    if not verify:
        return sd, None
    in_chans = encoder_sd["conv1.weight"].shape[1]
    encoder = SparseResNet.from_name(model_name, in_chans=in_chans, backend="dense")
    encoder.load_state_dict(encoder_sd, strict=True)
    timm_model = timm.create_model(model_name, num_classes=num_classes, in_chans=in_chans)
    timm_model.load_state_dict(sd, strict=True)
    errors = [conversion_error(encoder, timm_model)]
    if in_chans == 3 and num_classes > 0:  # torchvision has no in_chans, and num_classes=0 is an empty fc
        tv_model = torchvision.models.get_model(model_name, num_classes=num_classes)
        tv_model.load_state_dict(sd, strict=True)
        errors.append(conversion_error(encoder, tv_model, features=lambda x: torchvision_features(tv_model, x)))
    error = max(errors)
    if not error <= tolerance:
        raise ConversionError(f"converted {model_name} differs from the sparse encoder: "
                              f"max relative error {error:.3g} > {tolerance}")
    return sd, error
