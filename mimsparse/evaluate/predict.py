"""Top-k predictions of a finetuned classifier (``tools/finetune.py``'s best.safetensors or last.pth)
on image files, with the class names the finetuning run saved."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mimsparse.convert.export import load_weights_file
from mimsparse.errors import CheckpointError
from mimsparse.train.data import DataError, list_images


@dataclass
class Classifier:
    model: torch.nn.Module
    name: str
    classes: list[str]
    img_size: int


def load_classifier(path: str | Path, model_name: str | None = None, img_size: int | None = None) -> Classifier:
    """A finetuning output: a run folder (its best.safetensors), best.safetensors (model, class names and
    image size in the header) or last.pth (model and class names; image size from results.json)."""
    import timm

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    state, meta = load_weights_file(path)
    if "model" in state and "classes" in state:  # last.pth
        sd, name, classes = state["model"], state["model_name"], list(state["classes"])
        results = path.with_name("results.json")
        size = json.loads(results.read_text())["args"]["img_size"] if results.is_file() else None
    elif "class_names" in meta:
        sd, name, classes, size = state, meta["model_name"], json.loads(meta["class_names"]), int(meta["img_size"])
    else:
        raise CheckpointError(f"{path} holds no class names: pass the best.safetensors or last.pth of a "
                              f"tools/finetune.py run (or its folder)")
    name, size = model_name or name, img_size or size or 224
    model = timm.create_model(name, num_classes=len(classes))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit timm {name}: {str(e).splitlines()[0][:200]}") from e
    return Classifier(model.eval(), name, classes, size)


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched recursively (sorted)."""
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += list_images(p)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"{item}: no such image file or folder")
    if not paths:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return paths


@torch.no_grad()
def predict(classifier: Classifier, paths: list[Path], top_k: int = 5, batch_size: int = 32,
            device: str = "cpu") -> list[dict]:
    """One record per readable image: {"image", "top": [{"class", "index", "prob"}...]} (softmax
    probabilities, highest first); unreadable files get {"image", "error"}. Images are prepared as the
    finetuning evaluation does (shorter side to img_size, centre crop, ImageNet normalisation)."""
    from PIL import Image

    from mimsparse.evaluate.loaders import eval_transform
    from mimsparse.train.data import to_rgb

    transform, model = eval_transform(classifier.img_size), classifier.model.to(device)
    k = min(top_k, len(classifier.classes))
    records = []
    for start in range(0, len(paths), batch_size):
        batch, kept = [], []
        for p in paths[start:start + batch_size]:
            try:
                with Image.open(p) as img:
                    img.load()
                    batch.append(transform(to_rgb(img)))
                kept.append(p)
            except OSError as e:
                records.append({"image": str(p), "error": f"unreadable ({e})"})
        if not batch:
            continue
        probs = model(torch.stack(batch).to(device)).softmax(-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for p, v, i in zip(kept, values.tolist(), indices.tolist()):
            records.append({"image": str(p), "top": [{"class": classifier.classes[c], "index": c, "prob": pv}
                                                     for pv, c in zip(v, i)]})
    return records
