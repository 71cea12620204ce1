"""Reconstructions as pictures: original | masked input | reconstruction | reconstruction with the
visible patches pasted back, one row per image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mimsparse.train.data import IMAGENET_MEAN, IMAGENET_STD, to_rgb
from mimsparse.errors import ConfigError, DataError
from mimsparse.models.loss import patchify, unpatchify
from mimsparse.masking import check_image_size, upsample_mask

PANELS = ("original", "masked input", "reconstruction", "visible pasted back")
MASKED_GRAY = 0.5  # colour of hidden patches in the "masked input" panel


def unnormalize(images_bchw: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images -> [0, 1]."""
    mean = images_bchw.new_tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
    std = images_bchw.new_tensor(IMAGENET_STD).view(1, -1, 1, 1)
    return (images_bchw * std + mean).clamp(0.0, 1.0)


def normalize(images_bchw: torch.Tensor) -> torch.Tensor:
    mean = images_bchw.new_tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
    std = images_bchw.new_tensor(IMAGENET_STD).view(1, -1, 1, 1)
    return (images_bchw - mean) / std


def pred_to_pixels(pred_bld: torch.Tensor, images_bchw: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """Predictions [B, L, p*p*C] -> image [B, C, H, W] in the (ImageNet-normalised) input space.

    With ``norm_pix`` the model predicts each patch standardised by its own mean and variance
    (:func:`mimsparse.models.loss.pixel_targets`); those statistics come from the original patch:
    pixels = pred * sqrt(var + 1e-6) + mean."""
    b, c, h, w = images_bchw.shape
    pred = pred_bld.float()
    if norm_pix:
        target = patchify(images_bchw.float(), patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    return unpatchify(pred, patch_size, (h // patch_size, w // patch_size), c)


@torch.no_grad()
def reconstruct(model, images_bchw: torch.Tensor, visible_bhw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run an FCMAE (in eval mode: no stochastic depth) and return the four panels, each
    [B, 3, H, W] in [0, 1], keyed by :data:`PANELS`. ``visible``: bool [B, H/p, W/p], True = kept."""
    if images_bchw.shape[1] != len(IMAGENET_MEAN):
        raise ConfigError(f"visualisation needs RGB images, got {images_bchw.shape[1]} channels")
    was_training = model.training
    model.eval()
    try:
        _, pred, _ = model(images_bchw, visible_bhw)
    finally:
        model.train(was_training)
    images = images_bchw.float()
    recon = pred_to_pixels(pred, images, model.patch_size, model.norm_pix_loss)
    keep = upsample_mask(visible_bhw, model.patch_size).unsqueeze(1)  # [B, 1, H, W]
    original = unnormalize(images)
    return {
        "original": original,
        "masked input": torch.where(keep, original, torch.full_like(original, MASKED_GRAY)),
        "reconstruction": unnormalize(recon),
        "visible pasted back": unnormalize(torch.where(keep, images, recon)),
    }


def _to_pil(image_chw: torch.Tensor) -> Image.Image:
    arr = (image_chw.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def _wrap(text: str, font, width: int) -> str:
    """Break ``text`` at spaces so that each line fits ``width`` pixels (where a word allows)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def grid_image(panels: dict[str, torch.Tensor], gap: int = 4, titles: bool = True) -> Image.Image:
    """One row per image, one column per panel (in the dict's order), white gaps, titles on top
    (wrapped to the panel width)."""
    names = list(panels)
    b, _, h, w = panels[names[0]].shape
    font = ImageFont.load_default(size=max(10, min(18, w // 12)))
    labels = [_wrap(name, font, w) for name in names] if titles else []
    line = font.size + 2
    header = max(label.count("\n") + 1 for label in labels) * line + 6 if titles else 0
    canvas = Image.new("RGB", (len(names) * (w + gap) + gap, header + b * (h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for col, name in enumerate(names):
        x = gap + col * (w + gap)
        if titles:
            draw.multiline_text((x + w / 2, header / 2 + 2), labels[col], fill="black", font=font, anchor="mm",
                                align="center", spacing=2)
        for row in range(b):
            canvas.paste(_to_pil(panels[name][row]), (x, header + gap + row * (h + gap)))
    return canvas


def save_grid(panels: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(panels).save(path)
    return path


def parse_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '192x320' -> (192, 320) (height x width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ConfigError(f"image size {text!r} must be N or HxW with positive integers, e.g. 224 or 192x320")
    return parts[0], parts[1]


def load_image(path: str | Path, size_hw: tuple[int, int], patch_size: int = 32) -> torch.Tensor:
    """A file -> normalised [1, 3, H, W]: converted to RGB, scaled to cover H x W keeping its aspect
    ratio, centre-cropped. H and W must be multiples of ``patch_size``."""
    h, w = size_hw
    check_image_size(h, w, patch_size)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            img = to_rgb(img)
    except (OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {str(path)!r}: {e}") from e
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return normalize(x.unsqueeze(0))
