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

from ..checks import writable_dir
from ..errors import VitrimError

__all__ = ["default_data_root", "default_digits_root", "build_digits", "check_digits_output", "is_digits_dataset",
           "ensure_digits", "resolve_split", "class_names", "model_classes", "check_image_model", "check_classes", "image_dataset",
           "train_transform", "eval_transform", "build_train_loader", "build_eval_loader", "DIGITS_CANVAS"]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_CANVAS = 64      # canvas side in pixels: 8 x 8 = 64 patches of 8 px
DIGITS_SCALE = 4        # an 8 x 8 digit is drawn at 32 x 32: three quarters of the patches are background
DIGITS_VERSION = 3


def default_data_root() -> Path:
    """Where built datasets live: ``$VITRIM_HOME`` or ``~/.cache/vitrim``."""
    return Path(os.environ.get("VITRIM_HOME", Path.home() / ".cache" / "vitrim"))


DIGITS_MARKER = "VERSION"
_DIGITS_SIGNATURE = "vitrim digits canvases"


def is_digits_dataset(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a dataset written by :func:`build_digits` (it holds vitrim's ``VERSION`` marker)."""
    marker = Path(folder) / DIGITS_MARKER
    try:
        return marker.is_file() and marker.read_text(errors="replace").startswith(_DIGITS_SIGNATURE)
    except OSError:
        return False


def check_digits_output(root: str | os.PathLike) -> Path:
    """``root`` as a place :func:`build_digits` may write to, or a clear error; nothing is written.

    Accepted: a path that does not exist yet (its folder is created), an empty folder, or a digits
    dataset written earlier by vitrim (it is replaced). Anything else is refused: the build never
    deletes a folder or a file that vitrim did not write.
    """
    root = Path(root).expanduser()
    if root.exists() or root.is_symlink():
        if not root.is_dir():
            raise VitrimError(f"digits output {str(root)!r} is an existing file; accepted: a new folder, an empty "
                              f"folder or a digits dataset written earlier by vitrim (it is replaced)")
        if any(root.iterdir()) and not is_digits_dataset(root):
            raise VitrimError(f"digits output {str(root)!r} is a folder that vitrim did not write (no {DIGITS_MARKER} "
                              f"marker of a digits dataset); it is left untouched. Accepted: a new folder, an empty "
                              f"folder or a digits dataset written earlier by vitrim (it is replaced)")
    # the new dataset is built beside the old one, then moved in: the parent folder must take it
    try:
        writable_dir(root.parent if str(root.parent) else Path("."), "its folder")
    except VitrimError as err:
        raise VitrimError(f"digits output {str(root)!r} cannot be written: {err}") from None
    return root


def build_digits(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, train_placements: int = 4) -> Path:
    """Write scikit-learn's 1,797 handwritten digits as an ImageFolder of 64 x 64 PNG canvases.

    Each 8 x 8 digit is upscaled 4x (bilinear) and drawn at a random position on a dark canvas
    with faint noise, so a 64 x 64 input with 8 px patches has 64 tokens, of which most are
    background. Splits ``train/`` and ``val/`` are stratified by digit and fixed by ``seed``;
    each training digit is drawn at ``train_placements`` random positions (val: once), so no
    digit appears in both splits.

    ``root`` must be new, empty, or a digits dataset vitrim wrote before (:func:`check_digits_output`);
    the dataset is built in a temporary folder beside it and moved into place at the end, and the
    temporary folder is removed when the build fails.
    """
    import shutil
    import tempfile

    root = check_digits_output(root)
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = digits.target
    is_val = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        is_val[rng.choice(idx, size=int(round(len(idx) * val_fraction)), replace=False)] = True
    size = 8 * DIGITS_SCALE
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    try:
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
        (tmp / DIGITS_MARKER).write_text(f"{_DIGITS_SIGNATURE} v{DIGITS_VERSION}, seed {seed}\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the dataset is an ordinary folder
        # a half-written dataset never looks complete: the old one (checked above to be vitrim's or
        # empty) is moved aside, the new one moved in, then the old one removed
        if root.exists():
            old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".old"))
            os.replace(root, old / "data")
            try:
                tmp.rename(root)
            except BaseException:
                os.replace(old / "data", root)  # put the old dataset back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_digits_root() -> Path:
    """Where the embedded dataset lives unless told otherwise."""
    return default_data_root() / f"digits{DIGITS_CANVAS}"


def ensure_digits(root: Optional[str | os.PathLike] = None) -> Path:
    """The embedded dataset, built on first use."""
    root = Path(root) if root is not None else default_digits_root()
    if not is_digits_dataset(root):
        build_digits(root)
    return root


def _has_images(folder: Path) -> bool:
    """Stops at the first image: the dataset itself scans the tree afterwards."""
    return any(p.suffix.lower() in IMG_EXTENSIONS for p in folder.rglob("*"))


_OTHER_SPLIT = {"train": "val", "val": "train"}


def resolve_split(data: str | os.PathLike, split: str) -> Path:
    """``data/split`` if it exists, else ``data`` itself (a folder of class folders).

    A root that has the other split but not this one (``train/`` without ``val/``, or the reverse)
    is refused rather than read as a class-folder root (which would evaluate on the training
    images, or make ``train`` a class). Raises a clear error for a missing path, a folder without
    images in class folders, or images lying next to the class folders.
    """
    data = Path(data).expanduser()
    if not data.exists():
        raise VitrimError(f"data folder {str(data)!r} does not exist")
    if not data.is_dir():
        raise VitrimError(f"data path {str(data)!r} is not a folder; expected an ImageFolder layout "
                          f"(class folders with images, optionally under train/ and val/)")
    other = _OTHER_SPLIT.get(split)
    if (data / split).is_dir():
        folder = data / split
    elif other is not None and (data / other).is_dir():
        use = "training" if split == "train" else "validation (vitrim eval, and vitrim train after each epoch)"
        raise VitrimError(f"{str(data)!r} has a {other}/ folder but no {split}/ folder, which {use} needs; "
                          f"accepted: a root with train/ and val/ (each holding class folders), or the class-folder "
                          f"root of one split itself (e.g. --data {str(data / other)!r})")
    else:
        folder = data
    classes = [p for p in folder.iterdir() if p.is_dir()]
    if not classes or not any(_has_images(c) for c in classes):
        raise VitrimError(f"data folder {str(folder)!r} holds no images in class sub-folders "
                          f"(accepted extensions: {', '.join(IMG_EXTENSIONS)})")
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if loose:
        raise VitrimError(f"data folder {str(folder)!r} holds images directly ({', '.join(loose[:3])}"
                          f"{', ...' if len(loose) > 3 else ''}) next to its class folders: they would be read as "
                          f"a class of their own; move them into a class folder")
    return folder


def class_names(folder: str | os.PathLike) -> list[str]:
    """The classes of an ImageFolder in label order, as timm's ``ImageDataset`` assigns them (sorted
    folder names, natural order: ``2`` before ``10``; nested folders count by their last name)."""
    from timm.data.readers.reader_image_folder import find_images_and_targets

    _, class_to_idx = find_images_and_targets(str(folder), types=IMG_EXTENSIONS)
    return sorted(class_to_idx, key=class_to_idx.get)


def model_classes(model: torch.nn.Module) -> tuple[Optional[int], Optional[list[str]]]:
    """``(number of outputs, class names or None)`` of a classifier; names come from the model's
    ``pretrained_cfg["label_names"]`` (timm) or a non-default ``config.id2label`` (Hugging Face), and are
    only trusted when there is one per output."""
    n = getattr(model, "num_classes", None)
    names = None
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("label_names"):
        names = [str(x) for x in cfg["label_names"]]
    hf = getattr(model, "config", None)
    if n is None and hf is not None and getattr(hf, "num_labels", None) is not None:
        n = int(hf.num_labels)
        id2label = getattr(hf, "id2label", None) or {}
        labels = [str(id2label.get(i, "")) for i in range(n)]
        if labels and not all(lbl == f"LABEL_{i}" for i, lbl in enumerate(labels)):
            names = labels
    if n is not None and names is not None and len(names) != n:
        names = None  # a new head (--num-classes) keeps the old cfg: its names no longer apply
    return (int(n) if n is not None else None), names


def _preview(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def check_image_model(model: torch.nn.Module, folder: str | os.PathLike, what: str = "data") -> None:
    """ImageFolder data feeds image models only: refuse a model whose samples are not ``(3, H, W)``
    images (video clips, spectrograms), asked of its adapter, before any image is read."""
    from ..adapters import get_adapter

    shape = tuple(get_adapter(model).input_shape())
    if len(shape) != 3 or shape[0] != 3:
        raise VitrimError(f"{what} {str(folder)!r} is an image folder, but {type(model).__name__} takes samples of "
                          f"shape {shape}, not images (3, H, W); accepted: image classifiers. Video and audio "
                          f"models run in vitrim flops, bench and compare without --data, and from Python "
                          f"(docs/models/hf.md)")


def check_classes(folder: str | os.PathLike, model: torch.nn.Module, what: str = "data",
                  names: Optional[list[str]] = None, classes: Optional[list[str]] = None,
                  match_names: bool = True) -> list[str]:
    """The data in ``folder`` must fit the classifier of ``model``; raises a clear error otherwise.

    The number of class folders must equal the model's number of outputs, and where the model knows its
    class names (``names``, else :func:`model_classes`), folder ``i`` in sorted order (the label
    ImageFolder gives it) must be named like the model's class ``i``. ``classes``: the folder's
    classes when already known (:func:`class_names`); ``match_names=False``: the count only (a new head
    being trained). Returns the folder's classes.
    """
    check_image_model(model, folder, what)
    classes = list(classes) if classes is not None else class_names(folder)
    n, known = model_classes(model)
    if names is not None and (n is None or len(names) == n):
        known = [str(x) for x in names]
    if not match_names:
        known = None
    if n is None:
        return classes
    if n == 0:
        raise VitrimError(f"the model has no classifier head (num_classes=0), so accuracy on {what} "
                          f"{str(folder)!r} cannot be measured; accepted: a model with a head")
    if len(classes) != n:
        raise VitrimError(f"{what} {str(folder)!r} has {len(classes)} classes ({_preview(classes)}) but the model "
                          f"has {n} outputs; ImageFolder labels classes by sorted folder name, so the folders must be "
                          f"the model's {n} classes. To train a new head for this data: vitrim train "
                          f"--num-classes {len(classes)}")
    if known is not None:
        wrong = [(i, c, k) for i, (c, k) in enumerate(zip(classes, known)) if c != k]
        if wrong:
            shown = "; ".join(f"label {i} is folder {c!r}, the model's class {i} is {k!r}" for i, c, k in wrong[:3])
            raise VitrimError(f"{what} {str(folder)!r}: the class folders do not match the model's classes "
                              f"({len(wrong)} of {n} differ: {shown}); ImageFolder labels classes by sorted "
                              f"folder name, so accepted: folders named {_preview(known)}. To train a new "
                              f"head for this data: vitrim train --num-classes {len(classes)}")
    return classes


def image_dataset(folder: Path, transform=None) -> Dataset:
    from timm.data import ImageDataset

    # the extensions resolve_split accepts (timm's own default is only .png/.jpg/.jpeg)
    return ImageDataset(str(folder), transform=transform, input_key=";".join(IMG_EXTENSIONS))


@dataclass
class DataConfig:
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float


def _resolved(model: torch.nn.Module, img_size: Optional[int] = None) -> dict:
    """timm's data config of ``model`` at the size the model was built for: ``pretrained_cfg`` keeps the
    default size when ``img_size`` changed it (a timm ViT knows its own in ``patch_embed.img_size``)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = None
    if img_size is not None:
        size = (img_size, img_size)
    else:
        own = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if isinstance(own, (tuple, list)) and len(own) == 2 and all(isinstance(v, int) for v in own):
            size = tuple(own)
    if size is not None:
        cfg["input_size"] = (cfg["input_size"][0], *size)
    return cfg


def data_config(model: torch.nn.Module, img_size: Optional[int] = None) -> DataConfig:
    cfg = _resolved(model, img_size)
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


def train_transform(model: torch.nn.Module, recipe, img_size: Optional[int] = None):
    from timm.data import create_transform

    cfg = data_config(model, img_size)
    transform = create_transform(
        input_size=cfg.input_size, is_training=True, scale=recipe.scale, hflip=recipe.hflip,
        color_jitter=recipe.color_jitter or None, auto_augment=recipe.auto_augment,
        interpolation=recipe.interpolation, mean=cfg.mean, std=cfg.std,
        re_prob=recipe.reprob, re_mode=recipe.remode, re_count=recipe.recount,
    )
    _fix_posterize(transform)
    return transform


def eval_transform(model: torch.nn.Module, img_size: Optional[int] = None):
    """timm's eval transform for the model (DeiT: resize 256 bicubic, centre crop 224, ImageNet norm), at
    the size the model was built for (or ``img_size``)."""
    from timm.data import create_transform

    return create_transform(**_resolved(model, img_size))


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
