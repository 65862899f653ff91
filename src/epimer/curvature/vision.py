"""Curvature of image models (docs/method.md §4): image classifiers and CLIP zero-shot
classification, the paper's setting.

Data is an image folder (one sub-folder per class, the folder names being the class names)
or a ``.jsonl`` file of ``{"image": PATH, "label": ...}`` lines (paths relative to the file).

CLIP zero-shot: the class names and prompt templates build a frozen head from the text
tower, ``w_c = normalize(mean_k normalize(text_embed(template_k(c))))``, and the logits of an
image are ``exp(logit_scale) · normalize(image_embed(x)) · w_cᵀ`` (CLIP's own zero-shot
classifier). The image embedding is ``visual_projection(vision_model(x).pooler_output)``.
The differentiated module holds the image tower under CLIP's own names (``vision_model.*``,
``visual_projection.weight``), which are the names in a full CLIP checkpoint and in a
vision-only ``CLIPVisionModelWithProjection`` checkpoint alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from epimer.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: Default prompt templates of the zero-shot head (a short, common set; override with a file).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a blurry photo of a {}.",
    "a cropped photo of a {}.",
)


@dataclass(frozen=True)
class ImageSample:
    path: Path
    label: Any
    where: str


def read_images(data: Path) -> tuple[list[ImageSample], list[str] | None]:
    """The samples of an image folder (with its class names, sorted) or of a ``.jsonl`` file
    (class names None: labels as written)."""
    if data.is_dir():
        classes = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) < 2:
            raise InputError(f"{data}: an image folder holds one sub-folder per class, at least 2; found {len(classes)}")
        samples = [ImageSample(f, c, str(f)) for c in classes for f in sorted((data / c).iterdir())
                   if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        empty = [c for c in classes if not any(s.label == c for s in samples)]
        if empty:
            raise InputError(f"{data / empty[0]}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this class folder")
        return samples, classes
    if not data.is_file():
        raise InputError(f"{data}: data not found (an image folder or a .jsonl file)")
    if data.suffix != ".jsonl":
        raise InputError(f"{data}: image data is a folder of class folders or a .jsonl file; got {data.suffix!r}")
    from epimer.curvature.data import read_rows

    samples = []
    for line, row in read_rows(data):
        where = f"{data}:{line}"
        if not isinstance(row.get("image"), str) or "label" not in row:
            raise InputError(f"{where}: an image sample is {{\"image\": PATH, \"label\": ...}}")
        path = (data.parent / row["image"]) if not Path(row["image"]).is_absolute() else Path(row["image"])
        samples.append(ImageSample(path, row["label"], where))
    return samples, None


def load_image(sample: ImageSample) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(sample.path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{sample.where}: image {sample.path} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{sample.where}: {sample.path} is not a readable image ({e})") from None


def image_batches(samples: Sequence[ImageSample], labels: Sequence[int] | None, processor: Any, batch_size: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """``{"pixel_values", "labels"}`` batches, each image through the model's processor."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels = processor(images=[load_image(s) for s in chunk], return_tensors="pt")["pixel_values"]
        batch = {"pixel_values": pixels}
        if labels is not None:
            batch["labels"] = torch.tensor(labels[start : start + batch_size], dtype=torch.long)
        yield batch


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (class names, prompt templates)."""
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise InputError(f"{path}: no {what} in the file")
    return lines


def check_templates(templates: Sequence[str], where: str) -> None:
    for t in templates:
        if t.count("{}") != 1:
            raise InputError(f"{where}: template {t!r} must hold exactly one {{}} (where the class name goes)")


@torch.no_grad()
def zero_shot_head(clip: Any, tokenizer: Any, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) unit rows: per class, the normalised mean of its normalised prompt embeddings."""
    rows = []
    for c in classes:
        enc = tokenizer([t.format(c) for t in templates], padding=True, return_tensors="pt")
        enc = {k: v.to(clip.text_projection.weight.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        text = clip.text_projection(clip.text_model(**enc).pooler_output)  # (K, D)
        rows.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=0))
    return torch.stack(rows)


class CLIPZeroShot(nn.Module):
    """CLIP's image tower (named as in CLIP) with a frozen zero-shot head: logits =
    ``exp(logit_scale) · normalize(visual_projection(vision_model(x).pooler_output)) · headᵀ``."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, head: torch.Tensor,
                 logit_scale: float) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.register_buffer("zero_shot_head", head.detach().clone())  # (C, D)
        self.scale = math.exp(logit_scale)  # in double precision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        return self.scale * F.normalize(image, dim=-1) @ self.zero_shot_head.T


def class_names(path: Path | None, folder_classes: list[str] | None, where: Path) -> list[str]:
    """The zero-shot classes: a file's lines, else the image folder's class folders."""
    if path is not None:
        names = read_lines(path, "class name")
    elif folder_classes is not None:
        names = folder_classes
    else:
        raise InputError(f"{where}: a .jsonl of images names no classes; give --classes FILE (one class name a line, "
                         "in label order)")
    if len(set(names)) != len(names) or len(names) < 2:
        raise InputError(f"{path or where}: the class names must be at least 2 and distinct")
    return names


def dump_labels(names: Sequence[str]) -> str:
    return json.dumps(list(names))
