"""Feature-collapse analysis of ConvNeXt V2 (Woo et al. 2023, Sec. 3.2 / Fig. 3-4).

For an activation X of shape [C, H, W], X_i is the i-th channel's map reshaped to an HW vector.
The paper's average pairwise cosine distance is

    d(X) = 1/C^2 * sum_{i=1..C} sum_{j=1..C} (1 - cos(X_i, X_j)) / 2

i.e. an average over all C^2 ordered pairs, the C self-pairs (distance 0) included. Values lie in
[0, 1]: 0 when every channel is the same map up to a positive scale (collapse), 1/2 for mutually
orthogonal channels only in the limit of many channels, (C - 1) / (2C) exactly. With
``exclude_self=True`` the self-pairs are left out (divide by C(C-1)): orthogonal channels give
exactly 1/2, and two opposite channels give 1.

A channel whose map is all zeros (a dead channel) has no direction; we take its cosine with any other
channel to be 0, i.e. a distance of 1/2, and its self-pair contributes 0 like every other self-pair.

Per block the distance is averaged over images (each image is its own activation tensor). The
activation is the block's output (``where="block"``), the MLP's expansion layer after GELU, the
4C-channel tensor GRN normalises (``where="mlp"``; the paper's Fig. 3 shows those), or the same
tensor after GRN (``where="grn"``; what fc2 reads). A model pretrained without GRN is exported with
an identity GRN, so its "grn" and "mlp" values are equal.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from mimsparse.train.data import DataError, bundled_photo_paths, list_images
from mimsparse.errors import ConfigError

WHERE = ("block", "mlp", "grn")


def channel_cosine_distance(feats_chw: torch.Tensor, exclude_self: bool = False) -> float:
    """Average pairwise cosine distance (1 - cos)/2 between the channels of one [C, H, W] activation.

    ``exclude_self=False`` is the paper's 1/C^2 average over all ordered pairs (self-pairs count 0);
    ``exclude_self=True`` averages over the C(C-1) pairs i != j. Computed in float64 without forming
    the C x C Gram matrix: sum_{i != j} cos_ij = |sum_i u_i|^2 - sum_i |u_i|^2 for unit vectors u_i.
    """
    if feats_chw.dim() != 3:
        raise ValueError(f"expected a [C, H, W] tensor, got shape {tuple(feats_chw.shape)}")
    c = feats_chw.shape[0]
    if c < 2:
        raise ValueError(f"need at least 2 channels, got {c}")
    x = feats_chw.detach().reshape(c, -1).to(torch.float64)
    norms = x.norm(dim=1, keepdim=True)
    u = torch.where(norms > 0, x / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(x))
    off_diag_cos = u.sum(dim=0).square().sum() - u.square().sum()  # sum over ordered pairs i != j
    off_diag_dist = (c * (c - 1) - off_diag_cos) / 2
    denom = c * (c - 1) if exclude_self else c * c
    return float((off_diag_dist / denom).clamp(0.0, 1.0))


def load_timm_model(ckpt: dict, model_name: str | None = None):
    """A timm convnextv2 model in eval mode from a mimsparse pretraining checkpoint, or from a plain timm
    state dict (then ``model_name`` is required). Returns (model, model name)."""
    import timm

    from mimsparse.convert import ConversionError, convert_checkpoint

    if "model" in ckpt and "config" in ckpt:
        sd, name, _ = convert_checkpoint(ckpt, verify=False)
        if model_name is not None and model_name != name:
            raise ConversionError(f"checkpoint holds {name!r} but --model asks for {model_name!r}")
    else:
        if model_name is None:
            raise ConversionError("not a mimsparse pretraining checkpoint; for a plain timm state dict pass --model NAME "
                                  "(e.g. --model convnextv2_atto)")
        sd, name = ckpt, model_name
        for key in ("state_dict", "model"):  # common wrappers
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    fc = sd.get("head.fc.weight")
    num_classes = fc.shape[0] if isinstance(fc, torch.Tensor) else 0
    try:
        model = timm.create_model(name, num_classes=num_classes)
    except Exception as e:
        raise ConversionError(f"timm cannot create {name!r}: {e}") from e
    if not hasattr(model, "stages"):
        raise ConversionError(f"{name!r} has no .stages; expected a timm convnext/convnextv2 model")
    try:
        model.load_state_dict(sd, strict=num_classes > 0)
    except RuntimeError as e:
        raise ConversionError(f"state dict does not fit timm {name}: {str(e).splitlines()[0][:300]}") from e
    return model.eval(), name


def load_images(paths, img_size: int = 224) -> torch.Tensor:
    """[N, 3, S, S] ImageNet-normalised: scaled to cover S x S (bicubic), centre-cropped."""
    from mimsparse.visualize import load_image

    if not paths:
        raise DataError("no images to analyse")
    # any square size works: the analysis runs the dense timm model, which has no patch grid to fit
    return torch.cat([load_image(p, (img_size, img_size), patch_size=1) for p in paths])


def _hook_point(block, where: str):
    """(module whose output is measured, whether that output is channels-last [B, H, W, C])."""
    if where == "block":
        return block, False
    if where in ("mlp", "grn"):
        # timm runs the MLP on NCHW with 1x1 convs (conv_mlp: atto..nano) or on NHWC with Linear layers
        return (block.mlp.act if where == "mlp" else block.mlp.grn), not block.use_conv_mlp
    raise ConfigError(f"where must be one of {', '.join(WHERE)}, got {where!r}")


@torch.no_grad()
def feature_collapse(model, images: torch.Tensor, exclude_self: bool = False, batch_size: int = 8,
                     where: str = "block") -> list[dict]:
    """Per block of ``model.stages[i].blocks[j]``: the channel cosine distance of its output (or of its
    MLP expansion activation before / after GRN, ``where="mlp"`` / ``"grn"``), averaged over images. Returns rows
    {layer, stage, block, channels, distance} in network order (layer from 0)."""
    blocks = [(i, j, blk) for i, stage in enumerate(model.stages) for j, blk in enumerate(stage.blocks)]
    sums = [0.0] * len(blocks)
    channels = [0] * len(blocks)
    handles = []

    def hook(k, channels_last):
        def fn(_module, _inp, out):
            if out.dim() != 4:
                raise ValueError(f"activation has shape {tuple(out.shape)}, expected 4 dims")
            out = out.permute(0, 3, 1, 2) if channels_last else out
            channels[k] = out.shape[1]
            sums[k] += sum(channel_cosine_distance(f, exclude_self) for f in out)
        return fn

    was_training = model.training
    model.eval()
    try:
        for k, (_, _, blk) in enumerate(blocks):
            module, channels_last = _hook_point(blk, where)
            handles.append(module.register_forward_hook(hook(k, channels_last)))
        for start in range(0, len(images), batch_size):
            model.forward_features(images[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = len(images)
    return [{"layer": k, "stage": i, "block": j, "channels": channels[k], "distance": sums[k] / n}
            for k, (i, j, _) in enumerate(blocks)]


def write_csv(curves: dict[str, list[dict]], path: str | Path) -> None:
    """One row per (model, block)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "layer", "stage", "block", "channels", "distance"])
        w.writeheader()
        for label, rows in curves.items():
            for r in rows:
                w.writerow({"model": label, **r, "distance": f"{r['distance']:.6f}"})


def plot(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """One curve per model (label -> rows of :func:`feature_collapse`), stage boundaries as grey lines;
    rows that carry ``low`` and ``high`` (e.g. the range over seeds) also get a shaded band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, rows in curves.items():
        line, = ax.plot([r["layer"] for r in rows], [r["distance"] for r in rows], marker="o", ms=3, label=label)
        if all("low" in r and "high" in r for r in rows):
            ax.fill_between([r["layer"] for r in rows], [r["low"] for r in rows], [r["high"] for r in rows],
                            color=line.get_color(), alpha=0.2, lw=0)
    first = next(iter(curves.values()))
    for r in first[1:]:
        if r["block"] == 0:
            ax.axvline(r["layer"] - 0.5, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("avg. pairwise cosine distance")
    top = max(r["distance"] for rows in curves.values() for r in rows)
    ax.set_ylim(0, max(0.55, 1.05 * top))
    if len(curves) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analysis_images(source: str | Path | None, img_size: int, limit: int = 0) -> torch.Tensor:
    """[N, 3, S, S] normalised images: the bundled photos (None), a folder, or a built-in dataset's
    test split (mimsparse.evaluate.datasets), the first ``limit`` of them (0 = all)."""
    from mimsparse.evaluate.datasets import is_builtin, load_labelled

    if source is not None and is_builtin(str(source)):
        from mimsparse.evaluate.loaders import eval_transform

        data = load_labelled(str(source), "test")
        count = len(data) if limit <= 0 else min(limit, len(data))
        transform = eval_transform(img_size)  # the finetune / probe evaluation view of the same images
        return torch.stack([transform(data.image(i)) for i in range(count)])
    paths = bundled_photo_paths() if source is None else list_images(source)
    return load_images(paths[:limit] if limit > 0 else paths, img_size)
