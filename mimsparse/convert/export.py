"""Weights-only exports: a dense state dict as safetensors (the default) or ``.pth``, with what a user
needs to know about it in the safetensors header, and a timm / Hugging Face-style folder
(``config.json`` + ``model.safetensors``) that timm loads offline.

Every file is written to a temporary file in the same folder, fsynced and renamed (a reader never sees
half a file), with the mode an ordinary ``open()`` would give (0666 minus the umask: 0644 usually;
``tempfile`` alone would leave 0600).

Two shapes of ``.pth`` exist in the project, and the load line differs:

- bare: ``{name: tensor}`` (``tools/convert_to_dense.py``, finetune's ``best``): ``model.load_state_dict(torch.load(p, weights_only=True))``;
- wrapped: ``{"model": {name: tensor}}`` (``tools/convert_official.py export --dense``, as the official
  ConvNeXt-V2 code saves): ``model.load_state_dict(torch.load(p)["model"])``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mimsparse.errors import CheckpointError
from mimsparse.train.checkpoint import write_file_atomic

FORMATS = ("safetensors", "pth")
SUFFIXES = {".safetensors": "safetensors", ".pth": "pth", ".pt": "pth", ".bin": "pth"}
WEIGHTS_NAME = "model.safetensors"  # the file name timm and Hugging Face expect in an export folder


def export_format(path: str | Path, fmt: str | None = None) -> str:
    """``fmt`` if given, else the one the suffix names; safetensors for any other suffix."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise CheckpointError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt
    return SUFFIXES.get(Path(path).suffix, "safetensors")


def header_metadata(metadata: dict | None) -> dict[str, str]:
    """safetensors headers hold str -> str: numbers and lists become their JSON text."""
    out = {"format": "pt"}  # what transformers / timm expect of a torch safetensors file
    for k, v in (metadata or {}).items():
        if v is not None:
            out[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return out


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None,
                 fmt: str | None = None) -> Path:
    """A bare state dict to ``path`` (safetensors unless ``fmt``/the suffix say pth). ``metadata`` goes
    into the safetensors header; a ``.pth`` cannot carry it (it stays a plain state dict)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if export_format(path, fmt) == "safetensors":
        return write_file_atomic(path, lambda tmp: save_file(sd, tmp, metadata=header_metadata(metadata)))
    return write_file_atomic(path, lambda tmp: torch.save(sd, tmp))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header's metadata ({} for other files)."""
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights_file(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(contents, metadata) of a checkpoint or export: a ``.safetensors`` file (state dict, header
    metadata), or anything ``torch.load(weights_only=True)`` reads (its dict, {}). One-line
    CheckpointError for a missing, truncated or foreign file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        from mimsparse.train.checkpoint import load_checkpoint

        return load_checkpoint(path), {}
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    from safetensors.torch import load_file

    try:
        return load_file(str(path)), read_metadata(path)
    except Exception as e:  # safetensors raises its own SafetensorError for torn files
        raise CheckpointError(f"{str(path)!r} is truncated or not a safetensors file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from e


def save_timm_folder(state_dict: dict[str, torch.Tensor], folder: str | Path, model_name: str, num_classes: int,
                     metadata: dict | None = None, label_names: list[str] | None = None,
                     input_size: tuple[int, int, int] | None = None) -> Path:
    """``folder/config.json`` (timm's ``pretrained_cfg`` of ``model_name``, as ``timm.models.save_for_hf``
    writes it) + ``folder/model.safetensors``; the state dict is checked by a strict load first.
    ``input_size``: (C, H, W) the weights were trained at (default: timm's for ``model_name``)."""
    import timm
    from timm.models._hub import save_config_for_hf

    folder = Path(folder)
    model = timm.create_model(model_name, num_classes=num_classes, pretrained=False)
    model.load_state_dict(state_dict, strict=True)
    # our weights, not timm's release: its tag, test-time size and crop do not describe them
    config = {"pretrained_cfg": {"tag": "mimsparse", "license": None}}
    if label_names:
        config["label_names"] = list(label_names)
    data = {"input_size": input_size or model.pretrained_cfg.get("input_size") or (3, 224, 224),
            "crop_pct": model.pretrained_cfg.get("crop_pct", 0.875)}
    write_file_atomic(folder / "config.json",
                 lambda tmp: save_config_for_hf(model, tmp, model_config=config, data_config=data))
    save_weights(state_dict, folder / WEIGHTS_NAME, metadata)
    return folder


def load_lines(model_name: str, num_classes: int, path: str | Path, libraries=("timm",), wrapped: bool = False,
               folder: bool = False) -> list[str]:
    """The exact Python that loads an export of ``model_name`` in each library, for the tools to print."""
    path = str(path)
    if folder:
        file = str(Path(path) / WEIGHTS_NAME)
        return [f"timm.create_model('{model_name}', pretrained=True, num_classes={num_classes}, "
                f"pretrained_cfg_overlay=dict(file='{file}', num_classes={num_classes}))",
                f"timm.create_model('local-dir:{path}', pretrained=True)"]
    if export_format(path) == "safetensors":
        read = f"safetensors.torch.load_file('{path}')"
    else:
        read = f"torch.load('{path}', weights_only=True)" + ('["model"]' if wrapped else "")
    create = {"timm": f"timm.create_model('{model_name}', num_classes={num_classes})",
              "torchvision": f"torchvision.models.{model_name}(num_classes={num_classes})",
              "official": f"{model_name}(num_classes={num_classes or 1000})"}  # ConvNeXt-V2 repo's models/convnextv2.py
    strict = "" if num_classes or "official" not in libraries else ", strict=False"  # official: no head exported
    return [f"{create[lib]}.load_state_dict({read}{strict})" for lib in libraries]


def conversion_head(model_name: str, num_classes: int, keys) -> dict[str, torch.Tensor]:
    """The classifier entries ``keys`` that a conversion to ``num_classes`` draws (the families'
    ``to_dense`` draw their fresh head from seed 0 whatever the encoder holds): a state dict whose
    classifier equals them was never trained, so finetuning treats its head as fresh."""
    from mimsparse.models.registry import family_of

    family = family_of(model_name)
    with torch.random.fork_rng(devices=[]):
        encoder_sd = family.encoder.from_name(model_name, backend="dense").state_dict()
    sd = family.to_dense(encoder_sd, model_name, num_classes)
    return {k: sd[k] for k in keys if k in sd}
