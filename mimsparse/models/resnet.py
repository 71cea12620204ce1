"""Sparse ResNet (SparK): visible patches in, features at visible sites out, on any backend.

The geometry is torchvision's ResNet v1.5 (the stride of a bottleneck block sits in its 3x3 conv;
the shortcut is a 1x1 strided conv + BN). Parameters live in ``nn.Conv2d`` / ``nn.BatchNorm2d``
modules named exactly as in torchvision and timm (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer1.0.downsample.0/1``), so the encoder's state dict is the dense model's without ``fc``.

Export: timm's ResNet uses torchvision's keys and shapes for resnet18/34/50/101, so ``to_dense`` is the
identity on the encoder's entries (BatchNorm statistics included) plus a fresh ``fc``, and one state dict
loads with ``strict=True`` into both ``torchvision.models.resnet50(num_classes=N)`` and
``timm.create_model("resnet50", num_classes=N)``.

Sparsity (SparK): the active sites of every stage are the visible patches upsampled to that stage's
grid. Convs read active sites only (masked ones count as zero), strided convs and the max pool are
evaluated at the next stage's active sites only, and BatchNorm statistics come from active sites
only. A strided conv is not allowed to "dilate" the active set (every output whose window touches
an active site), so no information leaks into masked patches, however deep the network. The stem is
the same rule at stride 1: the visible pixels enter as a sparse map and the 7x7 stride-2 conv is
evaluated at the visible sites of its grid. With ``num_visible`` (every sample the same count) every
stage's sites follow from that count, so a backend can run the whole encoder without a host sync
(packed's static mode; ``torch.compile(fullgraph=True)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimsparse.backends import Backend
from mimsparse.errors import ConfigError, ConversionError
from mimsparse.masking import upsample_mask
from mimsparse.models.encoder import SparseEncoder
from mimsparse.models.keymap import check_encoder_entries

# name -> (block, blocks per stage), as torchvision.models.resnet* / timm's resnet*
RESNET_SIZES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
STEM_STRIDE = 4  # the 7x7 stride-2 conv, then the 3x3 stride-2 max pool
STAGE_WIDTHS = (64, 128, 256, 512)


def _conv(backend: Backend, x, conv: nn.Conv2d, active_out_bhw: torch.Tensor):
    """``conv``'s weight applied through the backend: submanifold at stride 1 (the active set stays),
    else evaluated at the next stage's active sites."""
    stride = conv.stride[0]
    if stride == 1:
        return backend.conv(x, conv.weight, conv.bias)
    return backend.strided_conv(x, conv.weight, conv.bias, stride, padding=conv.padding[0],
                                active_out_bhw=active_out_bhw)


def sparse_batch_norm(backend: Backend, x, bn: nn.BatchNorm2d):
    """SparK's sparse BatchNorm: ``bn`` over the [N, C] rows of all active sites of the batch, so training
    mode normalises with their mean and biased variance and updates the running statistics exactly as
    nn.BatchNorm2d does (momentum or cumulative average, unbiased running variance, num_batches_tracked;
    cross-process after convert_sync_batchnorm); eval mode uses the running statistics. Inactive sites
    stay zero / absent. The row backends run ``bn`` itself on the rows; the masked-dense one computes the
    same statistics as masked sums (no gather, so no host sync on a GPU)."""
    return backend.batch_norm(x, bn)


def _relu(backend: Backend, x):
    return backend.map_feats(x, F.relu)


def _shortcut(in_dim: int, out_dim: int, stride: int) -> nn.Sequential | None:
    """1x1 conv (strided) + BN where the identity does not fit (torchvision's ``downsample``)."""
    if stride == 1 and in_dim == out_dim:
        return None
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False), nn.BatchNorm2d(out_dim))


class SparseBasicBlock(nn.Module):
    """3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, plus the shortcut, ReLU (resnet18/34)."""

    expansion = 1

    def __init__(self, in_dim: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_dim, planes, stride)

    def forward(self, x, backend: Backend, active_bhw: torch.Tensor):
        """``active_bhw``: bool [B, h, w], the active sites of this block's output grid."""
        out = _relu(backend, sparse_batch_norm(backend, _conv(backend, x, self.conv1, active_bhw), self.bn1))
        out = sparse_batch_norm(backend, _conv(backend, out, self.conv2, active_bhw), self.bn2)
        return _relu(backend, backend.add(out, _apply_shortcut(backend, x, self.downsample, active_bhw)))


class SparseBottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (4x) -> BN, plus the shortcut, ReLU
    (resnet50/101, v1.5: the stride is in the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_dim: int, planes: int, stride: int = 1):
        super().__init__()
        out_dim = planes * self.expansion
        self.conv1 = nn.Conv2d(in_dim, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_dim)
        self.downsample = _shortcut(in_dim, out_dim, stride)

    def forward(self, x, backend: Backend, active_bhw: torch.Tensor):
        """``active_bhw``: bool [B, h, w], the active sites of this block's output grid."""
        out = _relu(backend, sparse_batch_norm(backend, _conv(backend, x, self.conv1, active_bhw), self.bn1))
        out = _relu(backend, sparse_batch_norm(backend, _conv(backend, out, self.conv2, active_bhw), self.bn2))
        out = sparse_batch_norm(backend, _conv(backend, out, self.conv3, active_bhw), self.bn3)
        return _relu(backend, backend.add(out, _apply_shortcut(backend, x, self.downsample, active_bhw)))


def _apply_shortcut(backend: Backend, x, downsample: nn.Sequential | None, active_bhw: torch.Tensor):
    if downsample is None:
        return x
    conv, bn = downsample
    return sparse_batch_norm(backend, _conv(backend, x, conv, active_bhw), bn)


BLOCKS = {"basic": SparseBasicBlock, "bottleneck": SparseBottleneck}


class SparseResNet(SparseEncoder):
    """ResNet whose convolutions, BatchNorms and max pool run over the visible sites only (SparK).

    The encoder contract of :class:`~mimsparse.models.encoder.SparseEncoder`: ``forward`` gives the last
    stage densely, ``forward_hierarchical`` all four stages (strides 4, 8, 16, 32), zero at masked patches.
    """

    def __init__(self, block: str = "bottleneck", layers=(3, 4, 6, 3), in_chans: int = 3,
                 backend: Backend | str = "dense"):
        super().__init__()
        if block not in BLOCKS:
            raise ConfigError(f"unknown ResNet block {block!r}; choose one of {', '.join(BLOCKS)}")
        if len(layers) != len(STAGE_WIDTHS):
            raise ConfigError(f"a ResNet has {len(STAGE_WIDTHS)} stages, got layers={tuple(layers)}")
        block_cls = BLOCKS[block]
        self.in_chans = in_chans
        self.depths = tuple(layers)
        self.conv1 = nn.Conv2d(in_chans, STAGE_WIDTHS[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        dims, in_dim = [], STAGE_WIDTHS[0]
        for i, (depth, planes) in enumerate(zip(layers, STAGE_WIDTHS)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(block_cls(in_dim, planes, stride if j == 0 else 1))
                in_dim = planes * block_cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))  # torchvision's names: layer1.0.conv1 ...
            dims.append(in_dim)
        self.stage_dims = tuple(dims)
        self.stage_strides = tuple(STEM_STRIDE * 2 ** i for i in range(len(layers)))
        self.backend = backend
        self.apply(_init_weights)

    @classmethod
    def from_name(cls, name: str, in_chans: int = 3, backend: Backend | str = "dense", **kwargs) -> "SparseResNet":
        if name not in RESNET_SIZES:
            raise ConfigError(f"unknown ResNet {name!r}; available: {', '.join(RESNET_SIZES)}")
        block, layers = RESNET_SIZES[name]
        return cls(block, layers, in_chans=in_chans, backend=backend, **kwargs)

    def stage_masks(self, visible_bhw: torch.Tensor) -> list[torch.Tensor]:
        """The active sites of each stage: bool [B, H/s, W/s] for s in ``stage_strides``."""
        return [upsample_mask(visible_bhw, self.patch_size // s) for s in self.stage_strides]

    def forward_sparse(self, image_bchw: torch.Tensor, visible_bhw: torch.Tensor, return_stages: bool = False,
                       num_visible: int | None = None):
        """image: [B, C, H, W]; visible: bool [B, H/32, W/32] (True = kept); num_visible: see
        SparseEncoder.forward_sparse (every stage's sites, and the strided convs' and max pool's output
        sites, then follow from it without a host sync: packed's static mode).
        Returns the backend's native tensor of the last stage (or a list of all four, finest first)."""
        self.check_mask(image_bchw, visible_bhw)
        backend, p = self.backend, self.patch_size
        # Stem: the visible pixels enter as a sparse map (masked pixels absent, i.e. zero), and the 7x7
        # stride-2 conv is evaluated at the visible sites of the stride-2 grid only.
        static = {} if num_visible is None else {"rows_per_sample": num_visible * p * p, "block": p}
        x = backend.from_dense(image_bchw, upsample_mask(visible_bhw, p), stride=1, **static)
        x = _conv(backend, x, self.conv1, upsample_mask(visible_bhw, p // 2))
        x = _relu(backend, sparse_batch_norm(backend, x, self.bn1))
        masks = self.stage_masks(visible_bhw)
        x = backend.max_pool(x, 3, 2, masks[0])
        outs = []
        for i, active in enumerate(masks):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x, backend, active)
            outs.append(x)
        return outs if return_stages else x


def _init_weights(module: nn.Module) -> None:
    # As torchvision's ResNet: He normal (fan_out) convs, BN weight 1 and bias 0.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---- export to torchvision / timm ------------------------------------------------------------------
def to_dense(encoder_sd: dict[str, torch.Tensor], model_name: str, num_classes: int = 1000,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete state dict for ``model_name`` with ``num_classes`` outputs: the encoder's entries
    plus a freshly initialised ``fc`` (nn.Linear's default init, as in both libraries), drawn from
    ``seed`` without touching the global RNG. Keys and shapes are checked against timm's model (built
    on the meta device: no init cost)."""
    import timm

    if model_name not in RESNET_SIZES:
        raise ConversionError(f"unknown ResNet {model_name!r}; available: {', '.join(RESNET_SIZES)}")
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


DENSE_HEAD = ("fc.",)  # the classifier of torchvision's and timm's ResNet


def from_dense(dense_sd: dict[str, torch.Tensor], model_name: str,
               leftover: dict | None = None) -> dict[str, torch.Tensor]:
    """A torchvision / timm ``model_name`` state dict -> our encoder state dict: the inverse of
    :func:`to_dense`, the identity without ``fc`` (the keys are the same; a strict load checks them)."""
    return {k: v for k, v in dense_sd.items() if not k.startswith(DENSE_HEAD)}


def torchvision_features(model, x_bchw: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet's last feature map [B, C, H/32, W/32] (timm's ``forward_features``)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x_bchw))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
    return x


def dense_models(model_name: str, num_classes: int, in_chans: int) -> dict:
    import timm
    import torchvision

    model = timm.create_model(model_name, num_classes=num_classes, in_chans=in_chans)
    models = {"timm": (model, model.forward_features)}
    if in_chans == 3 and num_classes > 0:  # torchvision has no in_chans, and num_classes=0 is an empty fc
        tv = torchvision.models.get_model(model_name, num_classes=num_classes)
        models["torchvision"] = (tv, lambda x: torchvision_features(tv, x))
    return models


def encoder_options(cfg) -> dict:
    if cfg.drop_path > 0:
        raise ConfigError(f"model.drop_path={cfg.drop_path}: stochastic depth is implemented for ConvNeXt V2 only, "
                          f"not for {cfg.name}; set model.drop_path=0")
    return {}
