"""What every ``vitrim`` subcommand shares: model and method arguments, option parsing, building the
unreduced and reduced models, device and input-size defaults."""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Optional

import torch
from torch import nn

from .. import api
from ..adapters import get_adapter
from ..checks import resolve_device
from ..errors import VitrimError
from ..methods.base import get_method_class, method_names, parse_option_value

__all__ = ["DEFAULT_MODEL", "DEFAULT_METHOD", "literal", "add_model_args", "method_options", "build_models",
           "label", "device_of", "input_hw", "input_shape", "is_no_method"]

#: user-facing defaults of the commands that take a timm model and a method
DEFAULT_MODEL = "deit_small_patch16_224"
DEFAULT_METHOD = "tome"

literal = parse_option_value


def is_no_method(name: Optional[str]) -> bool:
    return name in ("none", "", None)


def _option_users() -> dict[str, list[str]]:
    """Every option name of every registered method -> the methods that take it."""
    users: dict[str, list[str]] = {}
    for m in method_names():
        for opt in get_method_class(m).option_names():
            users.setdefault(opt, []).append(m)
    return users


def add_model_args(p: argparse.ArgumentParser, default_model: Optional[str] = DEFAULT_MODEL,
                   default_method: Optional[str] = DEFAULT_METHOD) -> None:
    """``--model``, ``--pretrained``, ``--checkpoint``, ``--img-size``, ``--target-gmacs``, ``--method`` and
    one ``--<option>`` per method option (Python literals)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model,
                   help=f"timm model name, or hf:PATH for a Hugging Face model folder (save_pretrained) "
                        f"(default: {default_model or 'the embedded model'})")
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the hub or its cache)")
    g.add_argument("--checkpoint", metavar="PATH", help="load a local state dict into the model")
    g.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    g.add_argument("--target-gmacs", type=float, metavar="G",
                   help="solve the method's strength (r or keep rate) for this GMACs budget (vitrim.solve)")
    g.add_argument("--method", default=default_method,
                   help=f"reduction method: {', '.join(method_names())}, or 'none' (default: {default_method})")
    o = p.add_argument_group("method options (Python literals)")
    for name, users in sorted(_option_users().items()):
        o.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", type=literal, metavar="VALUE",
                       help=f"used by {', '.join(users)}")


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line (the others take the method's own defaults, the
    same as in the Python API)."""
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    if is_no_method(args.method):
        if given:
            raise VitrimError(f"options {', '.join(given)} given without a method")
        return {}
    cls = get_method_class(args.method)
    accepted = cls.option_names()
    wrong = sorted(set(given) - set(accepted))
    if wrong:
        raise VitrimError(f"option(s) {', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to "
                          f"method {cls.name!r}; accepted: {', '.join('--' + a.replace('_', '-') for a in accepted)}")
    if getattr(args, "target_gmacs", None) is not None:
        return {**given, "target_gmacs": args.target_gmacs}
    return given


def build_models(args: argparse.Namespace):
    """``(unreduced, reduced or None, options)`` from the model and method arguments; a checkpoint is
    loaded after ``apply``, so a reduced model's checkpoint (with ``vitrim.*`` weights) loads too."""
    from ..models import create_model, hf_has_weights, load_checkpoint, read_checkpoint, state_dict_of

    base = create_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
    base.eval()
    reduced, options = None, {}
    if not is_no_method(args.method):
        given = method_options(args)
        reduced = api.apply(copy.deepcopy(base), args.method, **given)
        method = api.get_method(reduced)  # the options as applied: given, solved or the method's defaults
        options = {k: v for k, v in method.options().items() if k in given or k == method.strength}
    args.method_weights_loaded = False  # the reduced model's own parts (predictors ...) came from --checkpoint
    if args.checkpoint:
        state = state_dict_of(read_checkpoint(args.checkpoint))
        if reduced is not None:
            load_checkpoint(reduced, state, path=args.checkpoint)
            args.method_weights_loaded = any(k.startswith("vitrim.") for k in state)
        load_checkpoint(base, state, ignore_prefix="vitrim.", path=args.checkpoint)
    if not (args.pretrained or args.checkpoint or hf_has_weights(args.model)):
        print(f"note: {args.model} has random weights (no --pretrained/--checkpoint): "
              f"FLOPs and speed are valid, accuracy is not", file=sys.stderr)
    return base, reduced, options


def label(method: str, options: dict) -> str:
    """``"tome r=13"``: a method and its options, for tables."""
    return " ".join([method, *(f"{k}={v}" for k, v in options.items())])


def device_of(name: Optional[str]) -> torch.device:
    """The device to run on: ``name`` (checked to exist here), else CUDA when available, else the CPU."""
    return resolve_device(name)


def input_hw(model: nn.Module, img_size: Optional[int]) -> tuple[int, int]:
    """``(H, W)`` of the input: ``img_size`` square, else the model's default."""
    return (img_size, img_size) if img_size else tuple(get_adapter(model).default_img_size())


def input_shape(model: nn.Module, img_size: Optional[int]) -> tuple[int, ...]:
    """One sample's input shape (images ``(3, H, W)``; video ``(T, C, H, W)``; spectrograms ``(time, freq)``),
    asked of the model's adapter for ``img_size`` square or the model's default size."""
    return tuple(get_adapter(model).input_shape(input_hw(model, img_size)))
