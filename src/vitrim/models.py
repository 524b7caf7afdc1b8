"""Model creation for the CLI: timm names, ``pretrained=True`` and ``--checkpoint PATH``, with
errors that say what went wrong (unknown name, offline hub, missing or mismatched file)."""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .errors import VitrimError

__all__ = ["create_model", "load_checkpoint", "read_checkpoint", "state_dict_of"]


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None,
                 img_size: Optional[int] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with vitrim's checks; ``checkpoint`` loads a local state dict."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise VitrimError(f"unknown timm model {name!r}" + (f"; similar names: {', '.join(close)}" if close else "")
                          + "; see timm.list_models()")
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
        except TypeError as err:
            # models whose size is only a property of the input (convolutional stems: PVT-v2) take no
            # img_size argument; they run at the requested size anyway
            if "img_size" not in kwargs or "img_size" not in str(err):
                raise
            kwargs.pop("img_size")
            model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained:
            raise VitrimError(f"could not load pretrained weights for {name!r} ({type(err).__name__}: {err}). "
                              f"Without network access, download the weights elsewhere and pass "
                              f"--checkpoint PATH (or checkpoint=PATH)") from err
        raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def read_checkpoint(path: str) -> Any:
    """The object stored at ``path`` (``torch.load(weights_only=True)`` on CPU, or a ``.safetensors`` state dict)."""
    if not os.path.isfile(path):
        raise VitrimError(f"checkpoint {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise VitrimError(f"checkpoint {path!r} holds objects other than weights and plain values (e.g. a "
                          f"training run's last.pt with its RNG state), which vitrim does not unpickle here; "
                          f"accepted: a state dict or a dict holding one (timm, vitrim's best.pt, "
                          f"torch.save(model.state_dict())), or .safetensors") from err


def state_dict_of(saved: Any) -> dict[str, torch.Tensor]:
    """The model weights in what timm, vitrim or ``torch.save(model.state_dict())`` wrote, without a
    DDP ``module.`` prefix."""
    state = saved
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_checkpoint(model: nn.Module, checkpoint: str | Mapping[str, torch.Tensor],
                    ignore_prefix: Optional[str] = None, path: Optional[str] = None) -> nn.Module:
    """Load a state dict saved by timm, vitrim or ``torch.save(model.state_dict())``.

    ``checkpoint`` is a file path, or a state dict already read with :func:`read_checkpoint` /
    :func:`state_dict_of` (to load one file into several models; then ``path`` names it in errors).
    ``ignore_prefix`` drops keys with that prefix first (e.g. ``"vitrim."`` to load a reduced
    model's backbone into the unreduced model)."""
    if isinstance(checkpoint, str):
        path, state = checkpoint, state_dict_of(read_checkpoint(checkpoint))
    else:
        state = dict(checkpoint)
    if ignore_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(ignore_prefix)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise VitrimError(f"checkpoint {path!r} does not fit {type(model).__name__}: {str(err)[:600]}") from err
    return model
