"""Sparse ConvNeXt V2: sizes, blocks, the encoder and its export to timm, in timm's file order.

Visible patches in, features at visible sites out. Every operation goes through the backend, so the
same module runs on any backend. Parameter names follow timm's ``ConvNeXt`` (``stages.i.blocks.j.
conv_dw`` ...), so export to timm (``to_timm``) renames the stem/downsample modules and reshapes the
MLP of the conv-MLP sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimsparse.backends import Backend
from mimsparse.errors import ConfigError
from mimsparse.masking import upsample_mask
from mimsparse.models.encoder import SparseEncoder
from mimsparse.models.keymap import SAME, check_encoder_entries, convert_keys


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


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) whose statistics are computed in float32 for bf16/fp16 input
    (autocast on CPU would keep bf16 here); the output has the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class GRN(nn.Module):
    """Global Response Normalisation (timm layout: weight/bias [C], zero-initialised), built from the
    backend's per-sample ops ``sample_l2_norm`` and ``scale_samples``.

    Statistics are per sample over that sample's visible sites. The official sparse FCMAE code
    (MinkowskiGRN) normalises over the whole batch instead, mixing samples — a known bug
    (facebookresearch/ConvNeXt-V2 issue #86) that makes pretraining differ from the dense model
    the weights are later used in. tests/test_backends.py checks both facts.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x, backend: Backend):
        # timm: x + weight * (x * Nx) + bias with Nx = Gx / mean_c(Gx), Gx the L2 norm over sites;
        # folded into one scale per (sample, channel), in float32 (see Backend.scale_samples)
        gx = backend.sample_l2_norm(x)
        nx = gx / (gx.mean(dim=1, keepdim=True) + self.eps)
        return backend.scale_samples(x, torch.addcmul(torch.ones_like(nx), self.weight.float(), nx), self.bias)


class GrnMlp(nn.Module):
    """Parameters of timm's GlobalResponseNormMlp (fc1 -> GELU -> GRN -> fc2, per site), with its
    names; ``SparseConvNeXtBlock.forward`` runs them through the backend."""

    def __init__(self, dim: int, hidden: int, use_grn: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.grn = GRN(hidden) if use_grn else None
        self.fc2 = nn.Linear(hidden, dim)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole sample's residual branch."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x, backend: Backend, device: torch.device):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        scale = torch.empty(backend.batch_size(x), device=device).bernoulli_(keep) / keep
        return backend.scale_samples(x, scale)


class SparseConvNeXtBlock(nn.Module):
    """dwconv7 -> LN -> Linear 4x -> GELU -> GRN -> Linear -> DropPath, plus the residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, use_grn: bool = True, kernel_size: int = 7):
        super().__init__()
        # nn.Conv2d only holds the depthwise weight [C, 1, k, k] and bias; the backend runs it.
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.mlp = GrnMlp(dim, 4 * dim, use_grn)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, backend: Backend):
        shortcut = x
        x = backend.dwconv(x, self.conv_dw.weight, self.conv_dw.bias)
        x = backend.map_feats(x, lambda f: F.gelu(self.mlp.fc1(self.norm(f))))
        if self.mlp.grn is not None:
            x = self.mlp.grn(x, backend)
        x = backend.map_feats(x, self.mlp.fc2)
        x = self.drop_path(x, backend, self.conv_dw.weight.device)
        return backend.add(shortcut, x)


class SparseDownsample(nn.Module):
    """LN -> k2s2 conv between stages (timm: stages.i.downsample.{0,1})."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2):
        super().__init__()
        self.norm = LayerNorm(in_dim, eps=1e-6)
        self.conv = nn.Conv2d(in_dim, out_dim, stride, stride=stride)

    def forward(self, x, backend: Backend):
        x = backend.map_feats(x, self.norm)
        # output sites follow from the input: every k x k block holding a visible site
        return backend.strided_conv(x, self.conv.weight, self.conv.bias, self.conv.stride[0], padding=0)


class SparseConvNeXtV2(SparseEncoder):
    """ConvNeXt V2 whose convolutions are submanifold sparse convolutions over the visible sites.

    Parameter names follow timm's ``ConvNeXt`` (``stages.i.blocks.j.conv_dw`` ...), so conversion to
    timm is a rename of the stem/downsample modules and a reshape for the conv-MLP sizes.
    """

    def __init__(self, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), in_chans: int = 3,
                 drop_path_rate: float = 0.0, use_grn: bool = True, stem_stride: int = 4,
                 backend: Backend | str = "dense"):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} must have one entry per stage")
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.in_chans = in_chans
        self.stem_stride = stem_stride
        self.stem_conv = nn.Conv2d(in_chans, dims[0], stem_stride, stride=stem_stride)
        self.stem_norm = LayerNorm(dims[0], eps=1e-6)
        rates = [drop_path_rate * i / max(1, sum(depths) - 1) for i in range(sum(depths))]
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stage = nn.Module()
            stage.downsample = SparseDownsample(dims[i - 1], dim) if i > 0 else None
            start = sum(depths[:i])
            stage.blocks = nn.ModuleList(
                SparseConvNeXtBlock(dim, rates[start + j], use_grn) for j in range(depth)
            )
            self.stages.append(stage)
        self.backend = backend
        self.apply(_init_weights)

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "SparseConvNeXtV2":
        spec = get_spec(name)
        return cls(depths=spec.depths, dims=spec.dims, **kwargs)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage's output, finest first."""
        return self.dims

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """Stride of each stage's output w.r.t. the image, finest first: the stem, then x2 per downsample."""
        return tuple(self.stem_stride * 2 ** i for i in range(len(self.dims)))

    def forward_sparse(self, image_bchw: torch.Tensor, visible_bhw: torch.Tensor, return_stages: bool = False,
                       num_visible: int | None = None):
        """image: [B, C, H, W]; visible: bool [B, H/p, W/p] (True = kept), p = patch_size;
        num_visible: see SparseEncoder.forward_sparse.
        Returns the backend's native tensor of the last stage (or a list of all stages)."""
        self.check_mask(image_bchw, visible_bhw)
        backend = self.backend
        scale = self.patch_size // self.stem_stride
        rows = None if num_visible is None else num_visible * scale * scale  # stem sites per sample
        x = backend.patch_embed(image_bchw, upsample_mask(visible_bhw, scale),
                                self.stem_conv.weight, self.stem_conv.bias, self.stem_stride, rows, block=scale)
        x = backend.map_feats(x, self.stem_norm)
        outs = []
        for stage in self.stages:
            if stage.downsample is not None:
                x = stage.downsample(x, backend)
            for block in stage.blocks:
                x = block(x, backend)
            outs.append(x)
        return outs if return_stages else x


def _init_weights(module: nn.Module) -> None:
    # As timm / the official code: truncated normal 0.02 for conv and linear weights, zero biases.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---- export to timm (``timm.create_model(name)`` loads the result with strict=True) ---------------
_CONV1X1 = (lambda t: t[:, :, None, None], lambda t: t.flatten(1))  # Linear [out, in] <-> 1x1 conv


def _timm_keys(name: str) -> list:
    """(our key, timm key, layout) rows for ``name``; atto..nano store the MLP as 1x1 convs."""
    fc = _CONV1X1 if get_spec(name).conv_mlp else SAME
    block = "stages.{s}.blocks.{b}."
    return [
        ("stem_conv.{wb}", "stem.0.{wb}", SAME),
        ("stem_norm.{wb}", "stem.1.{wb}", SAME),
        ("stages.{s}.downsample.norm.{wb}", "stages.{s}.downsample.0.{wb}", SAME),
        ("stages.{s}.downsample.conv.{wb}", "stages.{s}.downsample.1.{wb}", SAME),
        *[(block + k, block + k, SAME) for k in ("conv_dw.{wb}", "norm.{wb}", "mlp.grn.{wb}",
                                                 "mlp.fc1.bias", "mlp.fc2.bias")],
        *[(block + k, block + k, fc) for k in ("mlp.fc1.weight", "mlp.fc2.weight")],
    ]


def encoder_to_timm(encoder_sd: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> timm ``model_name`` state dict without the classifier head."""
    return convert_keys(encoder_sd, _timm_keys(model_name), True, "ConvNeXt V2 encoder",
                        unexpected="unexpected encoder parameter {key!r}: not part of a {what}")


# timm's classifier: ``head.norm`` (kept by the FCMAE-pretrained releases) and ``head.fc`` (dropped by them)
TIMM_HEAD = ("head.", "norm_pre.")


def timm_to_encoder(timm_sd: dict[str, torch.Tensor], model_name: str,
                    leftover: dict | None = None) -> dict[str, torch.Tensor]:
    """timm ``model_name`` state dict -> our encoder state dict (the head is dropped); the inverse of
    :func:`encoder_to_timm` through the same table. Entries no row matches: an error, or into ``leftover``."""
    body = {k: v for k, v in timm_sd.items() if not k.startswith(TIMM_HEAD)}
    return convert_keys(body, _timm_keys(model_name), False, model_name,
                        unexpected="unexpected timm parameter {key!r} for {what}", leftover=leftover)


def to_timm(encoder_sd: dict[str, torch.Tensor], model_name: str, num_classes: int = 1000,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete state dict that ``timm.create_model(model_name, num_classes=N)`` loads with
    strict=True: the converted encoder plus a freshly initialised head (final norm + classifier),
    drawn from ``seed`` without touching the global RNG."""
    import timm

    with torch.random.fork_rng(devices=[]):
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


def dense_models(model_name: str, num_classes: int, in_chans: int) -> dict:
    import timm

    model = timm.create_model(model_name, num_classes=num_classes, in_chans=in_chans)
    return {"timm": (model, model.forward_features)}


def encoder_options(cfg) -> dict:
    return {"drop_path_rate": cfg.drop_path, "use_grn": cfg.use_grn}
