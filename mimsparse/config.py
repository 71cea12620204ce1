"""Pretraining configuration: frozen dataclasses are the truth; YAML files and ``key=value``
command-line overrides only change fields, and unknown keys or wrong types are refused by name."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mimsparse.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    name: str = "convnextv2_atto"   # convnextv2_atto ... convnextv2_huge | resnet18|34|50|101
    in_chans: int = 3
    drop_path: float = 0.0          # ConvNeXt V2 only (refused > 0 for ResNet)
    use_grn: bool = True            # ConvNeXt V2 only (a ResNet has no GRN; the value changes nothing there)
    decoder_dim: int = 512          # fcmae: width; spark: width at the coarsest stage, halved per x2 upsampling
    decoder_depth: int = 1          # fcmae: ConvNeXt V2 blocks; spark: conv pairs per upsampling block
    norm_pix_loss: bool = True
    decoder: str = "fcmae"          # fcmae (ConvNeXt V2 block) | linear (SimMIM: one 1x1 conv) | spark (SparK: all stages, UNet)
    encoder_input: str = "sparse"   # sparse (masked patches removed) | mask_token (SimMIM: learned token, dense)
                                    # | masked_image_dense (ablation: zeroed patches, plain dense encoder, leaks)
    loss: str = "mse"               # mse | l1
    loss_on: str = "masked"         # masked | all (patches the loss averages over)
    init: str = ""                  # dense weights the encoder starts from: timm/torchvision/official file or timm
                                    # folder (mimsparse.convert.dense_init); read at a fresh start, never at resume
    init_sha256: str = ""           # SHA-256 of model.init, recorded by the run; when set, the file must match it


@dataclass(frozen=True)
class MaskConfig:
    ratio: float = 0.6
    strategy: str = "random"        # random | block | progressive | importance
    start_ratio: float = 0.3        # progressive: ratio at the start, linear to `ratio` at the end of training
    block_min_patches: int = 4      # block: smallest block area drawn, in patches
    block_min_aspect: float = 0.3   # block: aspect ratios drawn log-uniformly in [a, 1/a]
    random_fraction: float = 0.25   # importance: share of the masked patches drawn at random


@dataclass(frozen=True)
class DataConfig:
    path: str = ""              # ImageFolder / flat folder, a built-in dataset name (mimsparse.evaluate.datasets),
                                # tar shards ('shards/train-{000000..000009}.tar', mimsparse.train.shards); "" = bundled photos
    img_size: int | str = 224   # training crop: N (square) or "HxW" (e.g. 192x320), multiples of the patch size
    min_scale: float = 0.2      # RandomResizedCrop scale range (min_scale, 1)
    repeat: int = 1             # passes over a small dataset per epoch
    num_workers: int = 0
    shuffle_buffer: int = 1000  # tar shards: samples each loader worker holds to shuffle within its shards (1 = off)

    @property
    def size_hw(self) -> tuple[int, int]:
        """The crop as (height, width), from ``img_size`` N or "HxW"."""
        try:
            parts = [int(v) for v in str(self.img_size).lower().split("x")]
        except ValueError:
            parts = []
        if isinstance(self.img_size, bool) or len(parts) not in (1, 2) or min(parts) <= 0:
            raise ConfigError(f"config key 'data.img_size' must be N or HxW with positive integers (e.g. 224 or "
                              f"192x320), got {self.img_size!r}")
        return parts[0], parts[-1]


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 1.5e-4     # lr = base_lr * batch_size / 256
    lr: float = 0.0             # absolute peak lr, used as given instead of base_lr's scaling (0 = off)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_epochs: float = 1.0
    min_lr: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8
    epochs: int = 10
    seed: int = 0
    output_dir: str = "runs/pretrain"
    log_every: int = 10
    save_every_epochs: int = 1
    # Checkpoints within an epoch too, so a job killed without warning (OOM killer, lost node: no signal
    # to stop on) loses at most this much: every N optimizer steps and/or every M minutes (0 = off).
    save_every_steps: int = 0
    save_every_minutes: float = 0.0
    max_steps: int = 0          # stop early after this many steps (0 = run all epochs)
    keep_last: int = 3          # step checkpoints kept besides checkpoint-best.pth; 0 keeps every one
    amp: str = "none"           # none | bf16 | fp16 (fp16: CUDA only; bf16 on CPU: dense and packed backends)
    compile: str = "off"        # off | default | reduce-overhead | max-autotune: torch.compile mode of the model
    clip_grad: float = 0.0      # max gradient norm (0 = off)
    accum_steps: int = 1        # gradient accumulation: optimizer step every N batches
    skip_nonfinite: int = 0     # non-finite steps skipped (no weight update) before training stops
    vis_every: int = 0          # every N steps write vis/step-N.png: original | masked | reconstruction | pasted (0 = off)
    tensorboard: bool = True    # also log to <output_dir>/tensorboard when the tensorboard package is installed
    wandb: bool = False         # also log to Weights & Biases (offline unless WANDB_MODE says otherwise)
    stop_signals: str = "SIGTERM,SIGINT,SIGUSR1"  # stop after the step in progress with a checkpoint, exit 75 ("" = none)


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def lr(self, world_size: int = 1) -> float:
        """The one place the learning rate is derived (as MAE): base_lr x effective batch / 256, where
        an optimizer step sees batch_size x accum_steps x processes images; ``optim.lr`` when set."""
        if self.optim.lr > 0:
            return self.optim.lr
        return self.optim.base_lr * self.train.batch_size * self.train.accum_steps * world_size / 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, key: str):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; it is the number the user meant
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        # an infinite or NaN learning rate, decay, ratio ... makes every weight non-finite
        raise ConfigError(f"config key {key!r} must be a finite number, got {value}")
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be true/false, got {value!r}")
    if typ in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if typ is str and value is None:
        return ""
    if not isinstance(value, typ):
        expected = getattr(typ, "__name__", None) or " or ".join(t.__name__ for t in typing.get_args(typ))
        raise ConfigError(f"config key {key!r} must be {expected}, got {type(value).__name__} {value!r}")
    return value


def _apply(obj, updates: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            near = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"did you mean {prefix + near[0]!r}? " if near else ""
            raise ConfigError(f"unknown config key {name!r}; {hint}known keys here: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} is a section; give it a mapping, got {value!r}")
            changes[key] = _apply(current, value, f"{name}.")
        else:
            changes[key] = _coerce(value, hints[key], name)
    return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> dict:
    """'optim.base_lr=1e-3' -> {'optim': {'base_lr': 0.001}} (values parsed as YAML scalars)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.epochs=5")
    dotted, raw = text.split("=", 1)
    _check_override_key(dotted.strip(), text)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:  # e.g. "[": keep the text; the key's type check names it
        value = raw
    # YAML 1.1 reads "1e-3" as a string; accept it as the number the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    node: dict = {}
    root = node
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return root


def _check_override_key(dotted: str, text: str) -> None:
    """Refuse ``train=5`` (a whole section given one value) by name: merged with the other overrides
    it would silently replace them."""
    obj = PretrainConfig()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in typing.get_type_hints(type(obj)):
            return  # unknown keys are refused with the list of known ones by _apply
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(obj):
        keys = ", ".join(f"{dotted}.{f.name}" for f in dataclasses.fields(obj))
        raise ConfigError(f"override {text!r}: {dotted!r} is a section, not a value; set one of its keys "
                          f"({keys})")


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    return config_from_dict(load_updates(path, overrides))


def load_updates(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The nested dict of values the user set: the YAML file, then the overrides in order (later wins)."""
    updates: dict = {}
    if path:
        updates = _read_yaml(Path(path))
    for text in overrides:
        updates = _merge(updates, parse_override(text))
    return updates


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass a YAML file, e.g. configs/fcmae_atto.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; see configs/ for examples")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}; "
                          f"see configs/ for examples") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r} ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return loaded


def config_from_dict(updates: dict) -> PretrainConfig:
    return _apply(PretrainConfig(), updates)
