"""Model creation for the CLI: timm names, ``pretrained=True`` and ``--checkpoint PATH``, with
errors that say what went wrong (unknown name, offline hub, missing or mismatched file)."""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .errors import VitrimError

__all__ = ["create_model", "create_hf_model", "is_hf_name", "hf_has_weights", "load_checkpoint", "read_checkpoint",
           "state_dict_of"]

HF_PREFIX = "hf:"
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf_name(name: str) -> bool:
    """``hf:PATH_OR_HUB_ID``, or a local folder with a ``config.json`` (what ``save_pretrained`` writes)."""
    return isinstance(name, str) and (name.startswith(HF_PREFIX) or (
        os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json"))))


def _hf_location(name: str) -> str:
    return name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name


def hf_has_weights(name: str) -> bool:
    """Whether an HF model name is a local folder that holds weights (not only a config)."""
    loc = _hf_location(name)
    return is_hf_name(name) and os.path.isdir(loc) and any(os.path.isfile(os.path.join(loc, f)) for f in _HF_WEIGHTS)


def create_hf_model(name: str) -> nn.Module:
    """The transformers model of ``hf:PATH`` (a ``save_pretrained`` folder or a hub id): the class named by
    its config's ``architectures``, with the folder's weights (``from_pretrained``) when it has them,
    else randomly initialised from the config."""
    try:
        import transformers
    except ImportError:
        raise VitrimError(f"{name!r} names a Hugging Face model, which needs transformers: pip install transformers") \
            from None
    loc = _hf_location(name)
    if not loc:
        raise VitrimError(f"{name!r}: give the folder (or hub id) after 'hf:', e.g. hf:./my_videomae")
    try:
        config = transformers.AutoConfig.from_pretrained(loc)
    except (OSError, ValueError) as err:
        raise VitrimError(f"could not read a Hugging Face config from {loc!r} ({type(err).__name__}: {str(err)[:300]}); "
                          f"accepted: a folder written by save_pretrained (config.json, weights) or, where the hub "
                          f"is reachable, a hub id") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise VitrimError(f"{loc!r}: its config.json names no transformers architecture ({arch!r}); accepted: "
                          f"folders written by a model's save_pretrained")
    if os.path.isdir(loc) and not hf_has_weights(name):
        return cls(config)
    try:
        return cls.from_pretrained(loc)
    except (OSError, ValueError, RuntimeError) as err:
        raise VitrimError(f"could not load the Hugging Face weights of {loc!r} ({type(err).__name__}: "
                          f"{str(err)[:300]})") from None


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None,
                 img_size: Optional[int] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with vitrim's checks; ``checkpoint`` loads a local state dict.

    ``hf:PATH`` (or a folder holding a ``config.json``, as ``save_pretrained`` writes it) builds a
    Hugging Face transformers model instead (:func:`create_hf_model`)."""
    import timm

    if not isinstance(name, str) or not name:
        raise VitrimError(f"model must be a timm model name (str), got {name!r}")
    if is_hf_name(name):
        if kwargs:
            raise VitrimError(f"model arguments {', '.join(kwargs)} apply to timm models only; a Hugging Face "
                              f"model takes its shape from its config.json")
        model = create_hf_model(name)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint)
        return model
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise VitrimError(f"unknown timm model {name!r}" + (f"; similar names: {', '.join(close)}" if close else "")
                          + "; see timm.list_models()")
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise VitrimError(f"img_size must be an int >= 1, got {img_size!r}")
        if "img_size" in kwargs and kwargs["img_size"] != img_size:
            raise VitrimError(f"img_size given twice ({img_size} and {kwargs['img_size']!r} in the model arguments)")
        kwargs["img_size"] = img_size
    if checkpoint is not None:
        state = state_dict_of(read_checkpoint(checkpoint), checkpoint)  # read before any model is built
    try:
        model = _timm_create(timm, name, pretrained and checkpoint is None, kwargs)
    except TypeError as err:
        raise VitrimError(f"{name} does not take the argument(s) given ({err}); accepted: the keyword arguments "
                          f"of its timm constructor") from None
    except (OSError, RuntimeError, ValueError) as err:
        if "size mismatch" in str(err):
            raise VitrimError(f"the pretrained weights of {name!r} do not fit the model built with {kwargs or 'its defaults'}"
                              f": {str(err)[:400]}") from None
        if pretrained:
            raise VitrimError(f"could not load pretrained weights for {name!r} ({type(err).__name__}: {str(err)[:300]}). "
                              f"Without network access, download the weights elsewhere and pass "
                              f"--checkpoint PATH (or checkpoint=PATH)") from err
        raise VitrimError(f"could not build {name!r} with {kwargs or 'its defaults'}: {err}") from err
    if checkpoint is not None:
        load_checkpoint(model, state, path=checkpoint)
    return model


def _timm_create(timm, name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        # models whose size is only a property of the input (convolutional stems: PVT-v2) take no
        # img_size argument; they run at the requested size anyway
        if "img_size" not in kwargs or "img_size" not in str(err):
            raise
        return timm.create_model(name, pretrained=pretrained, **{k: v for k, v in kwargs.items() if k != "img_size"})


_ACCEPTED = ("accepted: a state dict or a dict holding one under 'model' / 'state_dict' (timm, vitrim's best.pt or "
             "last.pt, torch.save(model.state_dict())), or a .safetensors file")


def read_checkpoint(path: str) -> Any:
    """The object stored at ``path`` (``torch.load(weights_only=True)`` on CPU, or a ``.safetensors`` state dict)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise VitrimError(f"checkpoint {path!r} does not exist or is not a file")
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise VitrimError(f"checkpoint {path!r} is empty; {_ACCEPTED}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error type for broken headers
            raise VitrimError(f"checkpoint {path!r} is not a valid .safetensors file ({err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise VitrimError(f"checkpoint {path!r} holds objects other than weights and plain values (Python objects "
                              f"that vitrim does not unpickle: unpickling can run code); {_ACCEPTED}") from None
        raise VitrimError(f"checkpoint {path!r} is not a PyTorch checkpoint (a torch.save file); {_ACCEPTED}") from None
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, AttributeError):
        raise VitrimError(f"checkpoint {path!r} is not a PyTorch checkpoint (a torch.save file) or is damaged; "
                          f"{_ACCEPTED}") from None


def state_dict_of(saved: Any, path: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The model weights in what timm, vitrim or ``torch.save(model.state_dict())`` wrote, without a
    DDP ``module.`` prefix."""
    state = saved
    for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    name = f"checkpoint {path!r}" if path else "the checkpoint"
    if not isinstance(state, dict) or not state:
        raise VitrimError(f"{name} holds {'an empty dict' if isinstance(state, dict) else type(state).__name__}, "
                          f"not a state dict; {_ACCEPTED}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise VitrimError(f"{name} holds a dict that is not a state dict (name -> tensor); {_ACCEPTED}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_checkpoint(model: nn.Module, checkpoint: str | Mapping[str, torch.Tensor],
                    ignore_prefix: Optional[str] = None, path: Optional[str] = None) -> nn.Module:
    """Load a state dict saved by timm, vitrim or ``torch.save(model.state_dict())``.

    ``checkpoint`` is a file path, or a state dict already read with :func:`read_checkpoint` /
    :func:`state_dict_of` (to load one file into several models; then ``path`` names it in errors).
    ``ignore_prefix`` drops keys with that prefix first (e.g. ``"vitrim."`` to load a reduced
    model's backbone into the unreduced model)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path, state = os.fspath(checkpoint), state_dict_of(read_checkpoint(checkpoint), os.fspath(checkpoint))
    else:
        state = dict(checkpoint)
    if ignore_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(ignore_prefix)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        def few(keys: list) -> str:
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        parts = ([f"{len(missing)} of the model's {len(own)} weights are missing ({few(missing)})"] if missing else []) \
            + ([f"{len(unexpected)} weights are not the model's ({few(unexpected)})"] if unexpected else [])
        hint = " (a reduced model's file? its method's parts are the 'vitrim.' keys: apply the method first)" \
            if any(k.startswith("vitrim.") for k in unexpected) else ""
        raise VitrimError(f"checkpoint {path!r} does not fit {type(model).__name__}: {'; '.join(parts)}{hint}; "
                          f"is it the weights of another architecture?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise VitrimError(f"checkpoint {path!r} does not fit {type(model).__name__}: {str(err)[:600]}") from err
    return model
