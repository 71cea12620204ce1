"""ConvNeXt V2 in Hugging Face transformers' layout (``ConvNextV2Model`` and
``ConvNextV2ForImageClassification``, the ``facebook/convnextv2-*`` repositories of the Hub) <-> our
encoder, through one table of exact key templates read both ways.

transformers names the blocks ``layers`` and their parts ``dwconv``, ``layernorm``, ``pwconv1``,
``grn``, ``pwconv2`` (the MLP as ``nn.Linear``, like ours, for every size), keeps GRN's parameters as
``[1, 1, 1, C]``, and puts the stem under ``embeddings`` and each stage's downsampling (LayerNorm,
then the 2x2 stride-2 conv) under ``downsampling_layer``. ``convnextv2.layernorm`` (the norm after
pooling) and ``classifier`` are the classification head. The bare ``ConvNextV2Model`` saves the same
keys without the ``convnextv2.`` prefix; they are read as the classifier's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mimsparse.convert.export import save_weights
from mimsparse.errors import ConversionError
from mimsparse.models.convnextv2 import CONVNEXTV2_SPECS, encoder_to_timm, timm_to_encoder
from mimsparse.models.keymap import SAME, Layout, convert_keys
from mimsparse.train.checkpoint import write_file_atomic

MARKER = "convnextv2.embeddings.patch_embeddings.weight"  # a key only this layout has
BARE_MARKER = MARKER.removeprefix("convnextv2.")  # the same key in ConvNextV2Model's own state dict
HEAD = ("convnextv2.layernorm.", "classifier.")
_GRN: Layout = (lambda t: t.reshape(1, 1, 1, -1), lambda t: t.flatten())
_LAYER = "convnextv2.encoder.stages.{s}.layers.{b}."
TABLE = [
    ("stem_conv.{wb}", "convnextv2.embeddings.patch_embeddings.{wb}", SAME),
    ("stem_norm.{wb}", "convnextv2.embeddings.layernorm.{wb}", SAME),
    ("stages.{s}.downsample.norm.{wb}", "convnextv2.encoder.stages.{s}.downsampling_layer.0.{wb}", SAME),
    ("stages.{s}.downsample.conv.{wb}", "convnextv2.encoder.stages.{s}.downsampling_layer.1.{wb}", SAME),
    ("stages.{s}.blocks.{b}.conv_dw.{wb}", _LAYER + "dwconv.{wb}", SAME),
    ("stages.{s}.blocks.{b}.norm.{wb}", _LAYER + "layernorm.{wb}", SAME),
    ("stages.{s}.blocks.{b}.mlp.fc1.{wb}", _LAYER + "pwconv1.{wb}", SAME),
    ("stages.{s}.blocks.{b}.mlp.grn.{wb}", _LAYER + "grn.{wb}", _GRN),
    ("stages.{s}.blocks.{b}.mlp.fc2.{wb}", _LAYER + "pwconv2.{wb}", SAME),
]


def is_transformers_convnextv2(sd: dict) -> bool:
    return MARKER in sd or BARE_MARKER in sd


def _prefixed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ConvNextV2Model state dict in ConvNextV2ForImageClassification's keys (others unchanged)."""
    return {f"convnextv2.{k}": v for k, v in sd.items()} if BARE_MARKER in sd else sd


def encoder_from_transformers(sd: dict[str, torch.Tensor], leftover: dict) -> tuple[dict, list[str]]:
    """(our encoder entries, the head's keys) of a transformers ConvNeXt V2 state dict; entries no row
    matches go to ``leftover`` (the caller names every misfit at once)."""
    sd = _prefixed(sd)
    head = sorted(k for k in sd if k.startswith(HEAD))
    body = {k: v for k, v in sd.items() if not k.startswith(HEAD)}
    return convert_keys(body, TABLE, False, "transformers ConvNeXt V2", leftover=leftover), head


def encoder_to_transformers(encoder_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> transformers' ``ConvNextV2Model`` layout without the pooled norm."""
    return convert_keys(encoder_sd, TABLE, True, "ConvNeXt V2 encoder",
                        unexpected="unexpected encoder parameter {key!r}: not part of a {what}")


# the timm classifier head <-> transformers': the norm after pooling and the linear classifier
_HEAD_KEYS = {"head.norm.weight": "convnextv2.layernorm.weight", "head.norm.bias": "convnextv2.layernorm.bias",
              "head.fc.weight": "classifier.weight", "head.fc.bias": "classifier.bias"}


def save_transformers_folder(timm_sd: dict[str, torch.Tensor], folder, model_name: str, num_classes: int,
                             image_size: int, metadata: dict | None = None, label_names: list[str] | None = None):
    """A timm ConvNeXt V2 state dict (what ``tools/convert_to_dense.py`` makes) as a folder that
    ``transformers.ConvNextV2ForImageClassification.from_pretrained(folder)`` loads (``ConvNextV2Model``
    when ``num_classes`` is 0): ``config.json`` + ``model.safetensors``, both written atomically after
    a strict load into transformers' model."""
    try:
        import transformers
    except ImportError as e:
        raise ConversionError("--format transformers needs the transformers package (pip install transformers)") from e
    spec = CONVNEXTV2_SPECS.get(model_name)
    if spec is None:
        raise ConversionError(f"--format transformers writes ConvNeXt V2 models; {model_name} has no transformers "
                              f"layout here (use --format timm)")
    labels = list(label_names or [f"LABEL_{i}" for i in range(num_classes)])
    architecture = "ConvNextV2ForImageClassification" if num_classes else "ConvNextV2Model"
    config = transformers.ConvNextV2Config(depths=list(spec.depths), hidden_sizes=list(spec.dims),
                                           image_size=image_size, architectures=[architecture],
                                           layer_norm_eps=1e-6,  # the pooled norm's, as timm's head.norm
                                           id2label=dict(enumerate(labels)) or {0: "LABEL_0"},
                                           label2id={name: i for i, name in enumerate(labels)} or {"LABEL_0": 0})
    sd = encoder_to_transformers(timm_to_encoder(timm_sd, model_name))
    sd.update({theirs: timm_sd[ours] for ours, theirs in _HEAD_KEYS.items() if ours in timm_sd})
    if not num_classes:  # the bare ConvNextV2Model: its keys have no "convnextv2." prefix
        sd = {k.removeprefix("convnextv2."): v for k, v in sd.items() if not k.startswith("classifier.")}
    model = getattr(transformers, architecture)(config)
    model.load_state_dict(sd, strict=True)  # transformers' loader only warns about misfits: check here
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_file_atomic(folder / "config.json", lambda tmp: Path(tmp).write_text(config.to_json_string()))
    save_weights(sd, folder / "model.safetensors", {**(metadata or {}), "format": "pt"})
    return folder


def convnextv2_name_of(sd: dict[str, torch.Tensor]) -> str | None:
    """The registered ConvNeXt V2 size whose widths and depths a transformers state dict has (None if none)."""
    sd = _prefixed(sd)
    stage = "convnextv2.encoder.stages.{}.layers."
    depths, dims = [], []
    while stage.format(len(depths)) + "0.dwconv.weight" in sd:
        s = len(depths)
        dims.append(sd[stage.format(s) + "0.dwconv.weight"].shape[0])
        depths.append(sum(1 for k in sd if k.startswith(stage.format(s)) and k.endswith(".dwconv.weight")))
    return next((name for name, spec in CONVNEXTV2_SPECS.items()
                 if tuple(spec.depths) == tuple(depths) and tuple(spec.dims) == tuple(dims)), None)


def timm_state_from_transformers(sd: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """A transformers ConvNeXt V2 state dict (classifier included) as timm ``model_name``'s."""
    sd = _prefixed(sd)
    leftover: dict = {}
    encoder, _ = encoder_from_transformers(sd, leftover)
    if leftover:
        raise ConversionError(f"unexpected transformers ConvNeXt V2 parameters: {sorted(leftover)[:3]}")
    timm_sd = encoder_to_timm(encoder, model_name)
    timm_sd.update({ours: sd[theirs] for ours, theirs in _HEAD_KEYS.items() if theirs in sd})
    return timm_sd
