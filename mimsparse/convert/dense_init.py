"""Start the sparse encoder from dense weights (``model.init=PATH``, ``--init PATH``): the reverse of
the dense export, for continuing masked pretraining from ImageNet weights on one's own images.

Accepted on disk (read with ``weights_only=True`` or safetensors; never arbitrary pickles):

- a timm / torchvision state dict: ``.pth``, ``.pt``, ``.bin``, ``.safetensors`` (bare, or under
  ``"model"``/``"state_dict"`` as training scripts save it; a DDP ``module.`` prefix is dropped);
- a timm / Hugging Face model folder: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``),
  in timm's layout or in transformers' (``ConvNextV2Model`` / ``ConvNextV2ForImageClassification``,
  :mod:`mimsparse.convert.hf_transformers`);
- an official ConvNeXt V2 checkpoint ``{"model": ...}``: the dense ``ConvNeXtV2`` or the FCMAE layout
  (its encoder), through the tables of :mod:`mimsparse.convert.official`;
- our own exports (``tools/convert_to_dense.py``, ``tools/convert_official.py export --dense``) and a
  mimsparse pretraining checkpoint (its encoder).

The key mapping is the family's own export table read backwards (``ModelFamily.from_dense`` in the
registry), so import and export cannot drift. The classifier is ignored, the decoder stays fresh,
and everything else is strict, as ``load_state_dict(strict=True)``: any missing or unexpected encoder
tensor, or a shape that differs, stops with one line naming them (and the size the file fits, if
another one). BatchNorm running statistics are encoder tensors and load with the weights.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mimsparse.errors import CheckpointError, ConversionError
from mimsparse.models.registry import family_of, model_names
from mimsparse.train.checkpoint import file_sha256, verify_checkpoint

FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm / Hugging Face save in a model folder
WRAPPERS = ("model", "state_dict")  # keys under which training scripts save the state dict (official, timm)


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_from_dense` did; ``line()`` is what a run prints, ``record()`` what it stores."""
    model_name: str
    path: str           # the file or model folder, absolute
    sha256: str         # of the weights file (a folder's model.safetensors / pytorch_model.bin)
    source: str         # the format, in words
    loaded: int         # encoder tensors loaded
    ignored: tuple[str, ...]  # modules of the file left out (classifier, another model's decoder)
    fresh: tuple[str, ...]    # modules of our model that keep their initialisation
    adapted: str = ""         # the stem's input channels, when adapted

    def line(self) -> str:
        ignored = ", ".join(self.ignored) or "nothing"
        fresh = ", ".join(self.fresh) or "nothing"
        adapted = f"; {self.adapted}" if self.adapted else ""
        return (f"init: {self.loaded} {self.model_name} encoder tensors from {self.path} ({self.source}); "
                f"ignored: {ignored}; fresh: {fresh}{adapted}")

    def record(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "format": self.source}


def init_from_dense(model: torch.nn.Module, path: str | Path, model_name: str, sha256: str = "") -> InitReport:
    """Load the dense weights at ``path`` into ``model``'s encoder (``model`` is an FCMAE or a bare
    encoder of ``model_name``), strictly. ``sha256``: when given, the file must hash to it (a rerun
    of a recorded ``config.yaml`` starts from the same weights)."""
    encoder = getattr(model, "encoder", model)
    file, contents, container = read_weights(path)
    digest = file_sha256(file)
    if sha256 and digest != sha256:
        raise CheckpointError(f"model.init={str(path)!r} has SHA-256 {digest[:12]}..., not the recorded "
                              f"model.init_sha256={sha256[:12]}...; pass the file the run started from or clear "
                              f"model.init_sha256")
    sd, layout, ignored = encoder_state_from_dense(contents, model_name)
    reference = encoder.state_dict()
    sd, adapted = adapt_input_channels(sd, reference)
    check_fits(contents, sd, reference, model_name, str(path), layout)
    encoder.load_state_dict(sd, strict=True)
    fresh = () if encoder is model else sorted({k.split(".")[0] for k in model.state_dict()
                                               if not k.startswith("encoder.")})
    return InitReport(model_name, str(Path(path).resolve()), digest, f"{layout}, {container}", len(sd),
                      _modules(ignored), tuple(fresh), adapted)


# ---- files -----------------------------------------------------------------------------------------
def read_weights(path: str | Path) -> tuple[Path, dict, str]:
    """(the weights file, its state dict, the container in words) of a file or a timm / Hugging Face
    model folder; one-line errors for anything else."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in FOLDER_WEIGHTS if (path / n).is_file()]
        if not (path / "config.json").is_file() or not found:
            raise ConversionError(f"model.init={str(path)!r} is a folder without config.json + "
                                  f"{' or '.join(FOLDER_WEIGHTS)}; pass a weights file or a timm/Hugging Face "
                                  f"model folder")
        return found[0], _state_dict(found[0]), f"model folder, {_architecture(path / 'config.json')}"
    if not path.is_file():
        raise ConversionError(f"model.init={str(path)!r} does not exist; pass a .pth/.pt/.bin/.safetensors "
                              f"file or a timm model folder")
    return path, _state_dict(path), f"{path.suffix or 'no suffix'} file"


def _state_dict(file: Path) -> dict:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as e:  # noqa: BLE001 (SafetensorError, OSError: a torn or foreign file)
            raise ConversionError(f"model.init={str(file)!r} is truncated or not a safetensors file "
                                  f"({_first_line(e)})") from e
    try:
        verify_checkpoint(file)  # not empty, zip CRCs intact
    except CheckpointError as e:
        raise ConversionError(f"model.init: {str(e).split('; ')[0]}") from e
    # the official checkpoints carry their argparse.Namespace; nothing else beyond tensors and containers
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            contents = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (EOF, bad zip, a refused class: a torn or foreign file)
            raise ConversionError(f"model.init={str(file)!r} is truncated or not a torch weights file "
                                  f"({_first_line(e)})") from e
    for key in WRAPPERS:
        if isinstance(contents, dict) and isinstance(contents.get(key), dict):
            contents = contents[key]
            break
    if not isinstance(contents, dict) or not contents or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in contents.items()):
        what = (f"dict with keys {sorted(map(str, contents))[:4]}" if isinstance(contents, dict)
                else type(contents).__name__)
        raise ConversionError(f"model.init={str(file)!r} is not a state dict (it holds a {what}); pass model "
                              f"weights: a {{name: tensor}} dict, bare or under 'model' / 'state_dict'")
    return contents


def _architecture(config_json: Path) -> str:
    try:
        config = json.loads(config_json.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"model.init: {str(config_json)!r} is not valid JSON ({_first_line(e)})") from e
    named = config.get("architecture") or ", ".join(config.get("architectures") or []) or config.get("model_type")
    return f"architecture {named or 'not named'}"  # timm's config names one; transformers' a list and a type


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# ---- layouts ---------------------------------------------------------------------------------------
def encoder_state_from_dense(sd: dict, model_name: str) -> tuple[dict, str, list[str]]:
    """(our encoder entries, the layout in words, keys of the file that are not the encoder's).

    The layout is told by a key only it has; the entries that fit no row of its table are returned
    among the encoder entries, so that :func:`check_fits` names them with the rest."""
    from mimsparse.convert import hf_transformers, official

    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # saved from a DDP-wrapped model
    if "encoder.downsample_layers.0.0.weight" in sd:
        body = {k: v for k, v in sd.items() if k.startswith("encoder.")}
        leftover: dict = {}
        ours = official.fcmae_from_official(body, leftover)
        ours = {k.removeprefix("encoder."): v for k, v in ours.items()}
        return {**ours, **leftover}, "official ConvNeXt V2 FCMAE checkpoint", sorted(sd.keys() - body.keys())
    if "downsample_layers.0.0.weight" in sd:
        head = [k for k in sd if k.startswith(official.OFFICIAL_HEAD)]
        leftover = {}
        ours = official.encoder_from_official_dense(sd, leftover)
        return {**ours, **leftover}, "official ConvNeXt V2 dense checkpoint", head
    if hf_transformers.is_transformers_convnextv2(sd):
        leftover = {}
        ours, head = hf_transformers.encoder_from_transformers(sd, leftover)
        return {**ours, **leftover}, "Hugging Face transformers ConvNeXt V2 state dict", head
    if any(k.startswith("encoder.") for k in sd):
        body = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
        return body, "mimsparse pretraining checkpoint", sorted(k for k in sd if not k.startswith("encoder."))
    family = family_of(model_name)
    head = [k for k in sd if k.startswith(family.dense_head)]
    leftover = {}
    ours = family.from_dense({k: v for k, v in sd.items() if k not in head}, model_name, leftover)
    return {**ours, **leftover}, f"{'/'.join(family.libraries)} {family.name} state dict", head


def adapt_input_channels(sd: dict, reference: dict) -> tuple[dict, str]:
    """A model for other images than RGB (``model.in_chans`` 1 for grayscale, 4+ for multispectral) gets
    the stem conv of an RGB file adapted as timm's ``create_model(..., pretrained=True, in_chans=N)``
    does (``adapt_input_conv``: summed over RGB for 1 channel, repeated and rescaled for more). Only
    the input-channel count of the stem, the encoder's first conv, may differ; all else stays strict."""
    from timm.models import adapt_input_conv

    stem = next(k for k, v in reference.items() if v.ndim == 4)
    theirs, ours = sd.get(stem), reference[stem]
    if theirs is None or theirs.ndim != 4 or theirs.shape[1] == ours.shape[1] or \
            (theirs.shape[0], *theirs.shape[2:]) != (ours.shape[0], *ours.shape[2:]):
        return sd, ""
    adapted = adapt_input_conv(ours.shape[1], theirs, base_chans=theirs.shape[1])
    return {**sd, stem: adapted}, (f"{stem} adapted from {theirs.shape[1]} to {ours.shape[1]} input channels "
                                   f"(timm's adapt_input_conv)")


def check_fits(contents: dict, sd: dict, reference: dict, model_name: str, path: str, layout: str) -> None:
    """``sd`` (``contents`` converted for ``model_name``) must fill ``reference``, the encoder's state
    dict, exactly, as a strict load: else one line naming what is missing, unexpected or of another
    shape, or the registered model the file does fit."""
    problems = misfit(sd, reference)
    if not problems:
        return
    fits = next((name for name in model_names() if name != model_name and not misfit(
        encoder_state_from_dense(contents, name)[0], _meta_state(name))), None)
    if fits:
        raise ConversionError(f"model.init={path!r} holds {fits} weights, not {model_name}'s; set "
                              f"model.name={fits} or pass {model_name} weights")
    raise ConversionError(f"model.init={path!r} (read as a {layout}) does not fit the {model_name} encoder: {problems}")


def misfit(sd: dict, reference: dict) -> str:
    """What keeps ``sd`` from a strict load into a module whose state dict is ``reference`` ("" if
    nothing). A BatchNorm's ``num_batches_tracked`` may be absent (torchvision's older files): torch
    sets it to 0 then."""
    missing = sorted(k for k in reference.keys() - sd.keys() if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(sd.keys() - reference.keys())
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(reference[k].shape)}" for k in sorted(sd.keys() & reference.keys())
              if sd[k].shape != reference[k].shape]
    return "; ".join(f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                     for what, v in (("missing", missing), ("unexpected", unexpected),
                                     ("shape mismatches (file vs model)", shapes)) if v)


def _meta_state(name: str) -> dict:
    """The state dict of ``name``'s encoder (3 input channels) on the meta device: shapes, no memory."""
    with torch.device("meta"):
        return family_of(name).encoder.from_name(name).state_dict()


def _modules(keys) -> tuple[str, ...]:
    """Ignored keys in a few words: their modules (``head.fc``), or the top-level ones if many."""
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    if len(modules) > 4:
        modules = sorted({k.split(".")[0] for k in keys})
    return tuple(modules)
