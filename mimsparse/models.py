"""Model size table: the nine ConvNeXt V2 sizes timm registers (depths and widths as in the paper)."""
from __future__ import annotations

from dataclasses import dataclass

from mimsparse.errors import ConfigError


@dataclass(frozen=True)
class ConvNeXtV2Spec:
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    # timm builds atto..nano with 1x1 Conv2d MLPs (conv_mlp=True): same maths, weights [out, in, 1, 1].
    conv_mlp: bool = False


CONVNEXTV2_SPECS: dict[str, ConvNeXtV2Spec] = {
    "convnextv2_atto": ConvNeXtV2Spec((2, 2, 6, 2), (40, 80, 160, 320), conv_mlp=True),
    "convnextv2_femto": ConvNeXtV2Spec((2, 2, 6, 2), (48, 96, 192, 384), conv_mlp=True),
    "convnextv2_pico": ConvNeXtV2Spec((2, 2, 6, 2), (64, 128, 256, 512), conv_mlp=True),
    "convnextv2_nano": ConvNeXtV2Spec((2, 2, 8, 2), (80, 160, 320, 640), conv_mlp=True),
    "convnextv2_tiny": ConvNeXtV2Spec((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_small": ConvNeXtV2Spec((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnextv2_base": ConvNeXtV2Spec((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnextv2_large": ConvNeXtV2Spec((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnextv2_huge": ConvNeXtV2Spec((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def get_spec(name: str) -> ConvNeXtV2Spec:
    if name not in CONVNEXTV2_SPECS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(CONVNEXTV2_SPECS)}")
    return CONVNEXTV2_SPECS[name]
