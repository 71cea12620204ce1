"""Checkpoints in the layouts of the official ConvNeXt-V2 code (facebookresearch/ConvNeXt-V2).

- **FCMAE layout**: ``models/fcmae.py`` ``FCMAE.state_dict()``, what ``main_pretrain.py`` saves under
  ``'model'``. The encoder is MinkowskiEngine's: convolution kernels ``[K, C_in, C_out]`` and
  depthwise kernels ``[K, C]`` (K = kernel volume, offsets ordered with the first spatial axis, y,
  fastest), biases ``[1, C]``, ``MinkowskiLayerNorm``/``MinkowskiLinear`` wrappers (``.ln.``,
  ``.linear.``), GRN ``gamma``/``beta`` ``[1, C]``. The stem is dense (``nn.Conv2d`` + channels-first
  LayerNorm). The decoder is ``proj``, ``mask_token``, dense ConvNeXt V2 ``Block``s under ``decoder.``
  (GRN ``[1, 1, 1, C]``) and ``pred``.
- **dense layout**: ``models/convnextv2.py`` ``ConvNeXtV2``, the model ``main_finetune.py`` trains
  (what its ``remap_checkpoint_keys`` turns the FCMAE layout into), without ``norm``/``head``.

Our parameters are in torch's dense layout, so import and export are renames plus reshapes of the
sparse kernels; both directions use one table of exact key templates.
"""
from __future__ import annotations

import argparse
import re

import torch

from mimsparse.backends.minkowski_layout import (channelwise_kernel, dense_dw_weight, dense_weight, me_kernel,
                                                  square_side)
from mimsparse.errors import ConversionError
from mimsparse.train.checkpoint import verify_checkpoint
from mimsparse.models.keymap import SAME, Layout, convert_keys
from mimsparse.models.convnextv2 import CONVNEXTV2_SPECS


# ---- kernel layouts: (ours -> official, official -> ours) -----------------------------------------
def _me_conv_from(kernel: torch.Tensor) -> torch.Tensor:
    k = _side(kernel)
    return dense_weight(kernel, k, k)


def _me_dw_from(kernel: torch.Tensor) -> torch.Tensor:
    k = _side(kernel)
    return dense_dw_weight(kernel, k, k)


def _side(kernel: torch.Tensor) -> int:
    try:
        return square_side(kernel)
    except ValueError as e:
        raise ConversionError(str(e)) from None


ME_CONV: Layout = (me_kernel, _me_conv_from)
ME_DW: Layout = (channelwise_kernel, _me_dw_from)
ROW: Layout = (lambda t: t.reshape(1, -1), lambda t: t.reshape(-1))            # [C] <-> [1, C]
NHWC: Layout = (lambda t: t.reshape(1, 1, 1, -1), lambda t: t.reshape(-1))     # [C] <-> [1, 1, 1, C]
_LAYOUTS = {"same": SAME, "me_conv": ME_CONV, "me_dw": ME_DW, "row": ROW, "nhwc": NHWC}

# ---- key tables: (our key, official key, layout); {s} stage, {b} block, {d} decoder block, {wb} weight|bias
_DENSE_BLOCK = [  # a dense ConvNeXt V2 block: timm names (ours) -> models/convnextv2.py Block
    ("conv_dw.{wb}", "dwconv.{wb}", "same"),
    ("norm.{wb}", "norm.{wb}", "same"),
    ("mlp.fc1.{wb}", "pwconv1.{wb}", "same"),
    ("mlp.grn.weight", "grn.gamma", "nhwc"),
    ("mlp.grn.bias", "grn.beta", "nhwc"),
    ("mlp.fc2.{wb}", "pwconv2.{wb}", "same"),
]
_SPARSE_BLOCK = [  # models/convnextv2_sparse.py Block (MinkowskiEngine modules)
    ("conv_dw.weight", "dwconv.kernel", "me_dw"),
    ("conv_dw.bias", "dwconv.bias", "row"),
    ("norm.{wb}", "norm.ln.{wb}", "same"),
    ("mlp.fc1.{wb}", "pwconv1.linear.{wb}", "same"),
    ("mlp.fc2.{wb}", "pwconv2.linear.{wb}", "same"),
    ("mlp.grn.weight", "grn.gamma", "row"),
    ("mlp.grn.bias", "grn.beta", "row"),
]
DENSE_KEYS = [
    ("stem_conv.{wb}", "downsample_layers.0.0.{wb}", "same"),
    ("stem_norm.{wb}", "downsample_layers.0.1.{wb}", "same"),
    ("stages.{s}.downsample.norm.{wb}", "downsample_layers.{s}.0.{wb}", "same"),
    ("stages.{s}.downsample.conv.{wb}", "downsample_layers.{s}.1.{wb}", "same"),
    *[(f"stages.{{s}}.blocks.{{b}}.{a}", f"stages.{{s}}.{{b}}.{o}", t) for a, o, t in _DENSE_BLOCK],
]
FCMAE_KEYS = [
    ("encoder.stem_conv.{wb}", "encoder.downsample_layers.0.0.{wb}", "same"),
    ("encoder.stem_norm.{wb}", "encoder.downsample_layers.0.1.{wb}", "same"),
    ("encoder.stages.{s}.downsample.norm.{wb}", "encoder.downsample_layers.{s}.0.ln.{wb}", "same"),
    ("encoder.stages.{s}.downsample.conv.weight", "encoder.downsample_layers.{s}.1.kernel", "me_conv"),
    ("encoder.stages.{s}.downsample.conv.bias", "encoder.downsample_layers.{s}.1.bias", "row"),
    *[(f"encoder.stages.{{s}}.blocks.{{b}}.{a}", f"encoder.stages.{{s}}.{{b}}.{o}", t) for a, o, t in _SPARSE_BLOCK],
    ("decoder.mask_token", "mask_token", "same"),
    ("decoder.proj.{wb}", "proj.{wb}", "same"),
    *[(f"decoder.blocks.{{d}}.{a}", f"decoder.{{d}}.{o}", t) for a, o, t in _DENSE_BLOCK],
    ("decoder.pred.{wb}", "pred.{wb}", "same"),
]

def _table(rows):
    """Rows name their layout by a short word for readability; resolve them to functions."""
    return [(ours, theirs, _LAYOUTS[layout]) for ours, theirs, layout in rows]


# ---- state dicts ----------------------------------------------------------------------------------
def fcmae_to_official(model_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our FCMAE state dict -> official ``models/fcmae.py`` FCMAE state dict.

    Only the official architecture has an official layout: a sparse encoder input, the FCMAE decoder
    and GRN in every block (``model.encoder_input=sparse``, ``model.decoder=fcmae``, ``model.use_grn``)."""
    if "input_mask_token" in model_sd or "decoder.mask_token" not in model_sd:
        raise ConversionError("only models with model.decoder=fcmae and model.encoder_input=sparse have an official "
                              "FCMAE layout; export the encoder alone (--dense, encoder_to_official_dense)")
    if not any(k.endswith(".mlp.grn.weight") for k in model_sd):
        raise ConversionError("the official encoder always has GRN; this model was built with model.use_grn=false")
    return convert_keys(model_sd, _table(FCMAE_KEYS), True, "official FCMAE layout")


def fcmae_from_official(official_sd: dict[str, torch.Tensor], leftover: dict | None = None) -> dict[str, torch.Tensor]:
    """Official FCMAE state dict -> ours (load it with ``strict=True`` into the model that
    :func:`official_config` describes); entries no row matches: an error, or into ``leftover``."""
    return convert_keys(official_sd, _table(FCMAE_KEYS), False, "official FCMAE layout", leftover=leftover)


def encoder_to_official_dense(encoder_sd: dict[str, torch.Tensor], num_classes: int | None = None,
                              seed: int = 0) -> dict[str, torch.Tensor]:
    """Our encoder state dict (keys without ``encoder.``) -> official ``ConvNeXtV2`` state dict.

    Without ``num_classes`` the classifier (``norm``, ``head``) is left out, as in the official FCMAE
    weights after ``remap_checkpoint_keys``; with it a fresh one is added (final LayerNorm at identity,
    head initialised as ``main_finetune.py`` does: trunc-normal std 2e-5, zero bias), so that
    ``ConvNeXtV2(num_classes=N).load_state_dict(sd)`` accepts it with ``strict=True``."""
    out = convert_keys(encoder_sd, _table(DENSE_KEYS), True, "official dense layout")
    if num_classes is not None:
        dim = [v for k, v in encoder_sd.items() if k.endswith(".mlp.fc2.bias")][-1].shape[0]  # last stage's width
        g = torch.Generator().manual_seed(seed)
        head = torch.nn.init.trunc_normal_(torch.empty(num_classes, dim), std=2e-5, a=-4e-5, b=4e-5, generator=g)
        out.update({"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim),
                    "head.weight": head, "head.bias": torch.zeros(num_classes)})
    return out


OFFICIAL_HEAD = ("norm.", "head.")  # the official ConvNeXtV2's classifier: final LayerNorm + Linear


def encoder_from_official_dense(official_sd: dict[str, torch.Tensor],
                                leftover: dict | None = None) -> dict[str, torch.Tensor]:
    """Official ``ConvNeXtV2`` state dict -> our encoder state dict (``norm``/``head`` are dropped);
    entries no row matches: an error, or into ``leftover``."""
    body = {k: v for k, v in official_sd.items() if not k.startswith(OFFICIAL_HEAD)}
    return convert_keys(body, _table(DENSE_KEYS), False, "official dense layout", leftover=leftover)


def official_config(official_sd: dict[str, torch.Tensor], args: dict | None = None) -> dict:
    """Config sections (for :func:`mimsparse.config.config_from_dict`) of the model an official FCMAE
    state dict belongs to: size, input channels and decoder from the shapes; mask ratio and
    norm-pix loss from the saved ``args`` when present."""
    stem = official_sd.get("encoder.downsample_layers.0.0.weight")
    if stem is None or "mask_token" not in official_sd:
        raise ConversionError("not an official FCMAE state dict (no 'encoder.downsample_layers.0.0.weight' "
                              "or 'mask_token')")
    num_stages = _count(official_sd, r"^encoder\.downsample_layers\.(\d+)\.")
    dims = [stem.shape[0]]
    for i in range(1, num_stages):
        dims.append(official_sd[f"encoder.downsample_layers.{i}.1.kernel"].shape[2])
    depths = [_count(official_sd, rf"^encoder\.stages\.{i}\.(\d+)\.") for i in range(num_stages)]
    names = [n for n, spec in CONVNEXTV2_SPECS.items() if list(spec.depths) == depths and list(spec.dims) == dims]
    if not names:
        raise ConversionError(f"no ConvNeXt V2 size has depths {depths} and widths {dims}")
    in_chans = stem.shape[1]
    patch = stem.shape[-1] * 2 ** (num_stages - 1)  # stem stride x one 2x downsampling per later stage
    if official_sd["pred.weight"].shape[0] != patch * patch * in_chans:
        raise ConversionError(f"pred predicts {official_sd['pred.weight'].shape[0]} values per patch; expected "
                              f"{patch}*{patch}*{in_chans} (patch size {patch})")
    model = {"name": names[0], "in_chans": in_chans, "decoder_dim": official_sd["mask_token"].shape[1],
             "decoder_depth": _count(official_sd, r"^decoder\.(\d+)\."), "decoder": "fcmae",
             "encoder_input": "sparse", "use_grn": True}
    cfg = {"model": model}
    args = args or {}
    if "norm_pix_loss" in args:
        model["norm_pix_loss"] = bool(args["norm_pix_loss"])
    if "mask_ratio" in args:
        cfg["mask"] = {"ratio": float(args["mask_ratio"])}
    return cfg


# official_config keys read from the checkpoint's saved ``args`` (training settings, not shapes)
ARGS_KEYS = ("mask.ratio", "model.norm_pix_loss")


def import_config(user: dict, found: dict) -> tuple[dict, list[str]]:
    """Config updates of an imported official checkpoint, and one note per key saying which value won.

    ``user``: what ``--config`` and the ``key=value`` overrides set (nested dict); ``found``:
    :func:`official_config`. The architecture always comes from the checkpoint's shapes (any other
    value could not load its weights); a training setting from its saved ``args`` (``mask.ratio``,
    ``model.norm_pix_loss``) yields to a value the user gave."""
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in user.items()}
    notes = []
    for section, values in found.items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            given = user.get(section, {}).get(key) if isinstance(user.get(section), dict) else None
            target = merged.setdefault(section, {})
            if dotted in ARGS_KEYS and given is not None:
                if given != value:
                    notes.append(f"{dotted}={given} from your config/command line (the checkpoint's args say {value})")
                continue
            target[key] = value
            if given is not None and given != value:
                notes.append(f"{dotted}={value} from the checkpoint's shapes (your {given} was not used: the weights "
                             f"only fit {value})")
            elif dotted in ARGS_KEYS:
                notes.append(f"{dotted}={value} from the checkpoint's args")
    return merged, notes


def _count(sd: dict, pattern: str) -> int:
    found = {int(m.group(1)) for m in (re.match(pattern, k) for k in sd) if m}
    return max(found) + 1 if found else 0


# ---- files ----------------------------------------------------------------------------------------
def load_official_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, args as a dict) from a file saved by the official code (``{'model': ...,
    'args': Namespace, ...}``) or a bare state dict. Loads with ``weights_only=True``; the saved
    ``argparse.Namespace`` is the one class allowed besides tensors and plain containers."""
    verify_checkpoint(path)  # exists, not empty, zip CRCs intact
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (a foreign file: pickle errors name a refused class, EOF, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ConversionError(f"cannot read {str(path)!r} as an official checkpoint: {first}") from e
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    sd = ckpt.get("model", ckpt)
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return sd, args
