"""Data: ImageFolder datasets through timm, DeiT transforms, Mixup/CutMix, samplers, and the
embedded default dataset (scikit-learn's handwritten digits on larger canvases).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import VitrimError

__all__ = ["default_data_root", "default_digits_root", "build_digits", "ensure_digits", "resolve_split",
           "image_dataset", "train_transform", "eval_transform", "build_train_loader", "build_eval_loader", "DIGITS_CANVAS"]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_CANVAS = 64      # canvas side in pixels: 8 x 8 = 64 patches of 8 px
DIGITS_SCALE = 4        # an 8 x 8 digit is drawn at 32 x 32: three quarters of the patches are background
DIGITS_VERSION = 3


def default_data_root() -> Path:
    """Where built datasets live: ``$VITRIM_HOME`` or ``~/.cache/vitrim``."""
    return Path(os.environ.get("VITRIM_HOME", Path.home() / ".cache" / "vitrim"))


def build_digits(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, train_placements: int = 4) -> Path:
    """Write scikit-learn's 1,797 handwritten digits as an ImageFolder of 64 x 64 PNG canvases.

    Each 8 x 8 digit is upscaled 4x (bilinear) and drawn at a random position on a dark canvas
    with faint noise, so a 64 x 64 input with 8 px patches has 64 tokens, of which most are
    background. Splits ``train/`` and ``val/`` are stratified by digit and fixed by ``seed``;
    each training digit is drawn at ``train_placements`` random positions (val: once), so no
    digit appears in both splits.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = digits.target
    is_val = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        is_val[rng.choice(idx, size=int(round(len(idx) * val_fraction)), replace=False)] = True
    size = 8 * DIGITS_SCALE
    tmp = root.with_name(root.name + ".tmp")
    for i, (img, label) in enumerate(zip(images, labels)):
        big = np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
                         dtype=np.float32)
        split = "val" if is_val[i] else "train"
        out = tmp / split / str(label)
        out.mkdir(parents=True, exist_ok=True)
        for j in range(1 if is_val[i] else train_placements):
            canvas = rng.uniform(0, 24, (DIGITS_CANVAS, DIGITS_CANVAS)).astype(np.float32)
            y, x = rng.integers(0, DIGITS_CANVAS - size + 1, size=2)
            canvas[y:y + size, x:x + size] = np.maximum(canvas[y:y + size, x:x + size], big)
            Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).convert("RGB").save(out / f"{i:04d}_{j}.png")
    (tmp / "VERSION").write_text(f"vitrim digits canvases v{DIGITS_VERSION}, seed {seed}\n")
    if root.exists():
        import shutil
        shutil.rmtree(root)
    tmp.rename(root)  # atomic: a half-written dataset never looks complete
    return root


def default_digits_root() -> Path:
    """Where the embedded dataset lives unless told otherwise."""
    return default_data_root() / f"digits{DIGITS_CANVAS}"


def ensure_digits(root: Optional[str | os.PathLike] = None) -> Path:
    """The embedded dataset, built on first use."""
    root = Path(root) if root is not None else default_digits_root()
    if not (root / "VERSION").is_file():
        build_digits(root)
    return root


def _has_images(folder: Path) -> bool:
    """Stops at the first image: the dataset itself scans the tree afterwards."""
    return any(p.suffix.lower() in IMG_EXTENSIONS for p in folder.rglob("*"))


def resolve_split(data: str | os.PathLike, split: str) -> Path:
    """``data/split`` if it exists, else ``data`` itself (a folder of class folders).

    Raises a clear error for a missing path or a folder without images.
    """
    data = Path(data)
    if not data.exists():
        raise VitrimError(f"data folder {str(data)!r} does not exist")
    if not data.is_dir():
        raise VitrimError(f"data path {str(data)!r} is not a folder; expected an ImageFolder layout "
                          f"(class folders with images, optionally under train/ and val/)")
    folder = data / split if (data / split).is_dir() else data
    if split == "train" and folder == data and (data / "val").is_dir():
        raise VitrimError(f"{str(data)!r} has a val/ folder but no train/ folder")
    classes = [p for p in folder.iterdir() if p.is_dir()]
    if not classes or not _has_images(folder):
        raise VitrimError(f"data folder {str(folder)!r} holds no images in class sub-folders "
                          f"(accepted extensions: {', '.join(IMG_EXTENSIONS)})")
    return folder


def image_dataset(folder: Path, transform=None) -> Dataset:
    from timm.data import ImageDataset

    return ImageDataset(str(folder), transform=transform)


@dataclass
class DataConfig:
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float


def data_config(model: torch.nn.Module) -> DataConfig:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return DataConfig(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"],
                      cfg["crop_pct"])


def _posterize_zero_safe(img, bits_to_keep, **_):
    """timm's posterize, with ``bits_to_keep = 0`` giving the black image older Pillow gave.

    timm's ``PosterizeIncreasing`` reaches 0 bits at magnitude 10 (``rand-m9-mstd0.5`` draws it),
    and Pillow >= 13 rejects 0; this keeps the DeiT recipe running with the old result.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform) -> None:
    """Swap the posterize ops of every RandAugment/AutoAugment inside ``transform`` (this object only)."""
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []) or []:
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize_zero_safe


def train_transform(model: torch.nn.Module, recipe):
    from timm.data import create_transform

    cfg = data_config(model)
    transform = create_transform(
        input_size=cfg.input_size, is_training=True, scale=recipe.scale, hflip=recipe.hflip,
        color_jitter=recipe.color_jitter or None, auto_augment=recipe.auto_augment,
        interpolation=recipe.interpolation, mean=cfg.mean, std=cfg.std,
        re_prob=recipe.reprob, re_mode=recipe.remode, re_count=recipe.recount,
    )
    _fix_posterize(transform)
    return transform


def eval_transform(model: torch.nn.Module):
    """timm's eval transform for the model (DeiT: resize 256 bicubic, centre crop 224, ImageNet norm)."""
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({}, model=model))


def build_train_loader(dataset: Dataset, recipe, batch_size: int, world_size: int, rank: int, seed: int,
                       workers: int) -> DataLoader:
    """Shuffled (optionally repeated-augmentation) loader; ``sampler.set_epoch(e)`` fixes each epoch's order."""
    if len(dataset) < batch_size * world_size:
        raise VitrimError(f"batch size {batch_size} x {world_size} process(es) is larger than the training set "
                          f"({len(dataset)} images); lower --batch-size")
    if recipe.repeated_aug and recipe.repeated_aug > 1:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                   num_repeats=recipe.repeated_aug)
        sampler.seed = seed  # timm's sampler seeds its permutation with epoch only
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def build_eval_loader(dataset: Dataset, batch_size: int, workers: int, world_size: int = 1,
                      rank: int = 0) -> DataLoader:
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                                  shuffle=False, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())
