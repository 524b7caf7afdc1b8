"""Atomic checkpoints with everything needed to resume exactly (model, optimiser, scheduler,
scaler, epoch, RNG states), so a killed run loses at most the unfinished epoch.

Everything in ``last.pt`` is a tensor or a plain value (the RNG states too), so the file reads with
``torch.load(weights_only=True)``: ``vitrim eval --checkpoint last.pt`` and ``--resume`` never unpickle
Python objects.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VitrimError

__all__ = ["atomic_save", "rng_state", "set_rng_state", "read_run_checkpoint", "RUN_KEYS"]

#: what ``vitrim train`` writes into last.pt (best.pt holds only model, epoch, top1, config)
RUN_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_top1", "config", "rng")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``:
    readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    """The Python, NumPy, torch (and CUDA) generator states as tensors and plain values
    (``weights_only``-loadable): NumPy's key array becomes an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (also the NumPy state object older vitrim versions stored)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    if isinstance(np_state[1], torch.Tensor):
        name, keys, pos, has_gauss, cached = np_state
        np_state = (name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_globals() -> list:
    """What a last.pt of vitrim <= the first release holds besides tensors: NumPy's RNG key array."""
    out = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    out.append(_reconstruct)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None and hasattr(dtypes, "UInt32DType"):
        out.append(dtypes.UInt32DType)
    return out


def read_run_checkpoint(path: str | os.PathLike, flag: str = "--resume") -> dict:
    """The training state in a ``last.pt`` written by ``vitrim train``, read with ``weights_only=True``,
    or a clear error saying what the file is instead (best.pt, a state dict, not a checkpoint)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VitrimError(f"{flag} {path!r} does not exist (expected a last.pt written by vitrim train)")
    what = f"{flag} {path!r}"
    try:
        # NumPy's key array as older last.pt files store it is allowed too (plain data, no code)
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise VitrimError(f"{what} holds Python objects other than tensors and plain values, which vitrim does "
                              f"not unpickle (unpickling can run code); expected a last.pt written by vitrim "
                              f"train") from None
        raise VitrimError(f"{what} is not a PyTorch checkpoint (a torch.save file); expected a last.pt written "
                          f"by vitrim train") from None
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, AttributeError, OSError) as err:
        first = str(err).splitlines()[0][:120] if isinstance(err, (RuntimeError, OSError)) and str(err) else ""
        raise VitrimError(f"{what} is not a PyTorch checkpoint (a torch.save file) or is damaged"
                          f"{f' ({first})' if first else ''}; expected a last.pt written by vitrim train") from None
    if not isinstance(ckpt, dict):
        raise VitrimError(f"{what} holds a {type(ckpt).__name__}, not a training run; expected a last.pt written "
                          f"by vitrim train")
    missing = [k for k in RUN_KEYS if k not in ckpt]
    if missing:
        if "model" in ckpt and "top1" in ckpt:
            hint = "it is a best.pt, which holds the weights only; resume from the run's last.pt"
        elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = "it is a state dict (weights only); to start from these weights use --checkpoint"
        else:
            hint = f"it lacks {', '.join(missing)}"
        raise VitrimError(f"{what} is not a vitrim training state (last.pt): {hint}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["epoch"], int):
        raise VitrimError(f"{what} is not a vitrim training state (last.pt): its config or epoch is malformed")
    return ckpt
