"""The timm classifier a finetune or a linear probe starts from, and the weights it loads.

``--checkpoint`` is detected by its keys (:func:`load_weights`):

- a mimsparse pretraining checkpoint (keys ``model`` and ``config``): converted on the fly to timm
  (:func:`mimsparse.convert.convert_checkpoint`, with its numerical self-check), fresh classifier;
- a plain timm state dict (parameter name -> tensor; ``.safetensors`` or ``.pth``, e.g. from
  ``tools/convert_to_dense.py``): loaded with strict=True; a classifier of another size, or the untrained
  one a conversion drew (said by the safetensors header, or recognised by its values), is replaced by a
  fresh one, so the head starts the same whichever route the weights come by;
- a timm model folder (``config.json`` naming the model + ``model.safetensors``);
- a Hugging Face transformers ConvNeXt V2 (a ``facebook/convnextv2-*`` folder, or its state dict):
  renamed to timm's layout, its trained classifier kept when it has as many classes;
- ``random``: timm's own initialisation, the baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mimsparse.convert import ConversionError, convert_checkpoint, hf_transformers
from mimsparse.convert.export import conversion_head, load_weights_file
from mimsparse.errors import ConfigError
from mimsparse.train.checkpoint import CheckpointError


@dataclass
class Weights:
    """What ``--ckpt`` holds: a timm state dict (None for random init) for the timm model ``name``."""

    state_dict: dict[str, torch.Tensor] | None
    name: str
    source: str  # one line for the log
    fresh_head: bool  # the classifier must be initialised here, whatever the state dict holds


def is_pretraining_checkpoint(ckpt: dict) -> bool:
    return "model" in ckpt and "config" in ckpt


def is_state_dict(ckpt: dict) -> bool:
    return bool(ckpt) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items())


def _read(ckpt: str) -> tuple[dict, dict]:
    """(contents, metadata) of a file, or of a timm / Hugging Face model folder (config.json + weights;
    a timm config names its model)."""
    if not Path(ckpt).is_dir():
        return load_weights_file(ckpt)
    import json

    from mimsparse.convert.dense_init import read_weights

    _, state, _ = read_weights(ckpt)
    config = json.loads((Path(ckpt) / "config.json").read_text())
    return state, {"model_name": config["architecture"]} if "architecture" in config else {}


def load_weights(ckpt: str, model_name: str | None, num_classes: int) -> Weights:
    """``ckpt``: a path or "random". ``model_name`` may be None for a pretraining checkpoint (it names
    its model); it must match it when given."""
    if ckpt == "random":
        if model_name is None:
            raise ConfigError("--checkpoint random needs --model NAME (e.g. --model convnextv2_atto)")
        return Weights(None, model_name, "random init (baseline)", fresh_head=True)
    state, metadata = _read(ckpt)
    if hf_transformers.is_transformers_convnextv2(state):  # e.g. a facebook/convnextv2-* folder of the Hub
        name = hf_transformers.convnextv2_name_of(state)
        if name is None:
            raise CheckpointError(f"{ckpt} holds a transformers ConvNeXt V2 whose widths and depths match no "
                                  f"convnextv2_* size of timm")
        if model_name is not None and model_name != name:
            raise CheckpointError(f"{ckpt} holds a transformers ConvNeXt V2 of {name}, not {model_name}: drop "
                                  f"--model or pass --model {name}")
        return Weights(hf_transformers.timm_state_from_transformers(state, name), name,
                       f"Hugging Face transformers ConvNeXt V2 {ckpt} as timm {name}", fresh_head=False)
    if is_pretraining_checkpoint(state):
        saved = state["config"]["model"]["name"]
        if model_name is not None and model_name != saved:
            raise CheckpointError(f"{ckpt} was pretrained as {saved!r} but --model asks for {model_name!r}; "
                                  f"drop --model or pass --model {saved}")
        sd, name, error = convert_checkpoint(state, num_classes, verify=True)
        check = f"max relative error vs the sparse encoder {error:.1e}" if error is not None else "not verified"
        return Weights(sd, name, f"pretraining checkpoint {ckpt} converted to timm {name} ({check})", fresh_head=True)
    if is_state_dict(state):
        recorded = metadata.get("model_name")  # tools/convert_to_dense.py and finetune exports record it
        if model_name is not None and recorded and model_name != recorded:
            raise CheckpointError(f"{ckpt} holds {recorded!r} (its header says so) but --model asks for "
                                  f"{model_name!r}; drop --model or pass --model {recorded}")
        model_name = model_name or recorded
        if model_name is None:
            raise ConfigError(f"{ckpt} is a timm state dict that does not name its model: pass --model NAME "
                              f"(e.g. --model convnextv2_atto)")
        fresh = metadata.get("head", "").startswith("fresh")  # written by tools/convert_to_dense.py
        return Weights(state, model_name, f"timm state dict {ckpt}", fresh_head=fresh)
    raise CheckpointError(f"{ckpt} is neither a mimsparse pretraining checkpoint (keys 'model' and 'config') nor a "
                          f"timm state dict (parameter name -> tensor); its top-level keys are "
                          f"{sorted(map(str, state))[:8]}")


def create_model(name: str, num_classes: int, drop_path_rate: float = 0.0) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path_rate)
    except (RuntimeError, TypeError) as e:  # unknown name; a model without drop path
        raise ConversionError(f"timm cannot create {name!r}: {e}") from e


def classifier_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the model's final classifier (``head.fc.*`` for ConvNeXt, ``fc.*`` for ResNet)."""
    classifier = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is classifier)
    return [f"{prefix}.{k}" for k in classifier.state_dict()]


def build_model(ckpt: str, model_name: str | None, num_classes: int, seed: int = 0, drop_path_rate: float = 0.0,
                head_init_scale: float = 1.0) -> tuple[torch.nn.Module, str, list[str]]:
    """The timm classifier with ``num_classes`` outputs and the weights of ``ckpt`` ("random" or a path).
    A fresh classifier is drawn from ``seed`` and scaled by ``head_init_scale``.
    Returns (model, model name, notes for the log)."""
    weights = load_weights(ckpt, model_name, num_classes)
    with torch.random.fork_rng(devices=[]):  # the fresh head comes from ``seed``, whatever ran before
        torch.manual_seed(seed)
        model = create_model(weights.name, num_classes, drop_path_rate)
    notes = [f"weights: {weights.source}"]
    fresh_head = weights.fresh_head
    if weights.state_dict is not None:
        own, sd = model.state_dict(), dict(weights.state_dict)
        head = [k for k in classifier_keys(model) if k in sd]
        mismatched = [k for k in head if sd[k].shape != own[k].shape]
        if mismatched:
            old = sd[mismatched[0]].shape[0]
            notes.append(f"replaced the state dict's {old}-class classifier by a fresh {num_classes}-class one")
            fresh_head = True
        elif head and not fresh_head and _is_conversion_head(sd, weights.name, num_classes, head):
            fresh_head = True
            notes.append("the state dict's classifier was never trained (drawn at conversion): a fresh one is "
                         "drawn from --seed and scaled, as for a pretraining checkpoint")
        if fresh_head:
            sd.update({k: own[k] for k in head})
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:])  # line 0 only names the class
            raise CheckpointError(f"{ckpt} does not fit timm {weights.name}: {detail[:300]}") from e
    if fresh_head:
        # a near-zero head leaves the pretrained features undisturbed in the first steps (ConvNeXt V2, MAE)
        with torch.no_grad():
            for p in model.get_classifier().parameters():
                p.mul_(head_init_scale)
    return model, weights.name, notes


def _is_conversion_head(sd: dict, name: str, num_classes: int, keys: list[str]) -> bool:
    try:
        drawn = conversion_head(name, num_classes, keys)
    except (ConversionError, ValueError, KeyError):  # not a model the project converts
        return False
    return len(drawn) == len(keys) and all(torch.equal(sd[k], drawn[k]) for k in keys)
