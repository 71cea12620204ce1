"""The model-family registry: every encoder name, its family, and what building, converting,
benchmarking and the tools need from it. Nothing else in the package dispatches on a model name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mimsparse.errors import ConfigError
from mimsparse.models import convnextv2, resnet


@dataclass(frozen=True)
class ModelFamily:
    name: str
    encoder: type                       # a SparseEncoder subclass with ``from_name(name, in_chans, backend, **options)``
    sizes: Mapping[str, Any]            # model name -> its architecture
    encoder_options: Callable[[Any], dict]  # ModelConfig -> family-specific encoder options (ConfigError if unsupported)
    to_dense: Callable[..., dict]       # (encoder state dict, model name, num_classes) -> dense state dict
    dense_models: Callable[..., dict]   # (model name, num_classes, in_chans) -> {library: (model, features fn)}
    libraries: tuple[str, ...]          # the libraries whose model loads ``to_dense``'s output (strict=True)
    from_dense: Callable[..., dict]     # ``to_dense`` reversed: (dense state dict, model name, leftover) -> encoder
    dense_head: tuple[str, ...]         # key prefixes of the dense model's classifier (never loaded into the encoder)


FAMILIES: dict[str, ModelFamily] = {
    "convnextv2": ModelFamily("ConvNeXt V2", convnextv2.SparseConvNeXtV2, convnextv2.CONVNEXTV2_SPECS,
                              convnextv2.encoder_options, convnextv2.to_timm, convnextv2.dense_models, ("timm",),
                              convnextv2.timm_to_encoder, convnextv2.TIMM_HEAD),
    "resnet": ModelFamily("ResNet", resnet.SparseResNet, resnet.RESNET_SIZES, resnet.encoder_options, resnet.to_dense,
                          resnet.dense_models, ("timm", "torchvision"), resnet.from_dense, resnet.DENSE_HEAD),
}


def model_names() -> list[str]:
    return [name for family in FAMILIES.values() for name in family.sizes]


def family_of(model_name: str) -> ModelFamily:
    for family in FAMILIES.values():
        if model_name in family.sizes:
            return family
    raise ConfigError(f"model.name={model_name!r} is not a known encoder; choose one of: {', '.join(model_names())}")

