"""Checks of user inputs that every tool makes before any work starts: output paths, devices,
positive numbers. Each raises :class:`~vitrim.errors.VitrimError` saying what was wrong and what is
accepted."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .errors import VitrimError

__all__ = ["writable_dir", "writable_file", "resolve_device", "positive_int", "non_negative_int"]

PathLike = Union[str, os.PathLike]


def writable_dir(path: PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder that can be written: created if missing (with its parents) and probed with a
    temporary file, so a path that cannot take the output fails now, not after the work."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise VitrimError(f"{what} {str(p)!r} is an existing file, not a folder; accepted: a folder path "
                          f"(it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".vitrim-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise VitrimError(f"{what} {str(p)!r} cannot be written ({err.strerror or err}); accepted: a folder "
                          f"you can create and write") from None
    return p


def writable_file(path: PathLike, what: str = "output file", suffixes: Optional[tuple[str, ...]] = None) -> Path:
    """``path`` as a file that can be written (its folder is created if missing and probed).

    ``suffixes``: the accepted file endings (e.g. ``(".png",)``), checked too.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise VitrimError(f"{what} {str(p)!r} is a folder; accepted: a file path"
                          + (f" ending in {' or '.join(suffixes)}" if suffixes else ""))
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise VitrimError(f"{what} {str(p)!r} must end in {' or '.join(suffixes)}")
    try:
        writable_dir(p.parent, "its folder")
    except VitrimError as err:
        raise VitrimError(f"{what} {str(p)!r} cannot be written: {err}") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise VitrimError(f"{what} {str(p)!r} exists and cannot be overwritten (no write permission)")
    return p


def resolve_device(name: Optional[Any] = None) -> torch.device:
    """The device to run on: ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a ``torch.device``),
    checked to exist here; ``None``: CUDA when available, else the CPU."""
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(name, torch.device):
        name = str(name)  # messages show 'cuda:0', not the repr
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise VitrimError(f"unknown device {name!r}; accepted: cpu, cuda, cuda:N, mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VitrimError(f"device {name!r} asked for, but CUDA is not available here (no GPU, no driver or a "
                              f"CPU-only PyTorch); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VitrimError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise VitrimError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise VitrimError(f"device {name!r} cannot run vitrim here; accepted: cpu, cuda, cuda:N, mps")
    return dev


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(value: Any, what: str) -> int:
    """``value`` as an int >= 1, or a clear error naming ``what``."""
    if not _is_int(value) or value < 1:
        raise VitrimError(f"{what} must be an int >= 1, got {value!r}")
    return value


def non_negative_int(value: Any, what: str) -> int:
    """``value`` as an int >= 0, or a clear error naming ``what``."""
    if not _is_int(value) or value < 0:
        raise VitrimError(f"{what} must be an int >= 0, got {value!r}")
    return value
