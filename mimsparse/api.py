"""What a user of the library needs, in one place; ``import mimsparse`` exposes these names lazily
(torch, timm and the backends load on first use, not on ``import mimsparse``)."""
from __future__ import annotations

from pathlib import Path

from mimsparse.config import PretrainConfig, _merge, config_from_dict, load_config, parse_override


def as_config(config: PretrainConfig | str | Path | None = None, overrides=()) -> PretrainConfig:
    """A config from a PretrainConfig, a YAML path, or a model name (``"convnextv2_atto"``, ``"resnet50"``:
    the defaults with that encoder); ``overrides``: ``section.key=value`` strings."""
    if isinstance(config, PretrainConfig):
        updates = config.to_dict()
        for text in overrides:
            updates = _merge(updates, parse_override(text))
        return config_from_dict(updates)
    if config is None or str(config).endswith((".yaml", ".yml")) or Path(str(config)).is_file():
        return load_config(config, overrides)
    return load_config(None, [f"model.name={config}", *overrides])


def build_model(config: PretrainConfig | str | Path | None = None, backend: str = "dense", overrides=(),
                init: str | Path | None = None):
    """The masked-image-modeling model (encoder + decoder + loss + mask) of ``config`` (see
    :func:`as_config`) on ``backend``; ``model(images)`` returns (loss, pred [B, L, p*p*3], visible [B, h, w]).

    ``init``: dense weights to start the encoder from (a timm/torchvision/official state dict or timm
    folder, see :mod:`mimsparse.convert.dense_init`); default the config's ``model.init``, "" for none."""
    from mimsparse.models.build import build_fcmae

    cfg = as_config(config, overrides)
    return _init(build_fcmae(cfg, backend), cfg, init)


def build_encoder(config: PretrainConfig | str | Path | None = None, backend: str = "dense", overrides=(),
                  init: str | Path | None = None):
    """The sparse encoder alone: ``encoder(images, visible)`` -> last feature map [B, C, H/32, W/32];
    ``init`` as in :func:`build_model`."""
    from mimsparse.models.build import build_encoder as build

    cfg = as_config(config, overrides)
    return _init(build(cfg.model, backend), cfg, init)


def _init(model, cfg: PretrainConfig, init: str | Path | None):
    from mimsparse.convert.dense_init import init_from_dense

    init = cfg.model.init if init is None else str(init)
    if init:  # the recorded SHA-256 holds for the config's own file only
        init_from_dense(model, init, cfg.model.name, cfg.model.init_sha256 if init == cfg.model.init else "")
    return model


def load_checkpoint(path: str | Path) -> dict:
    """A pretraining checkpoint (dict with ``model``, ``config``, ...) or an export (a state dict; a
    ``.safetensors`` file too)."""
    from mimsparse.convert.export import load_weights_file

    return load_weights_file(path)[0]


def load_pretrained(path: str | Path, backend: str = "dense"):
    """The model a pretraining checkpoint holds, with its weights, in eval mode, on ``backend``."""
    ckpt = load_checkpoint(path)
    model = build_model(config_from_dict(ckpt["config"]), backend, init="")  # the weights are the checkpoint's
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval()
