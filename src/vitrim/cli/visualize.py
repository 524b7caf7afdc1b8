"""``vitrim visualize``: the command line of :func:`vitrim.visual.visualize`."""
from __future__ import annotations

import argparse
import sys

from .. import api
from ..errors import VitrimError
from ..models import create_model, load_checkpoint, read_checkpoint, state_dict_of
from ..checks import writable_file
from ..visual import visualize
from ..visual.pictures import PICTURE_FORMATS
from ..zoo import EMBEDDED_MODEL, is_digits_model
from .common import DEFAULT_METHOD, add_model_args, is_no_method, method_options

__all__ = ["add_visualize_parser", "cmd_visualize"]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def add_visualize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vitrim visualize`` (model and method flags as ``vitrim flops``, default: the embedded model)."""
    p = subparsers.add_parser(
        "visualize", help="draw what a method did to an image, per layer",
        description="A grid of the image with, per layer, ToMe's merge groups, the pruned/squeezed tokens "
                    "(EViT, TPS, DynamicViT) or the idle tokens (IdleViT), read from the method's provenance. "
                    "No IMAGE: a digits canvas for the embedded model, else scikit-image's astronaut.")
    p.add_argument("image", nargs="?", help="image file (default: see above)")
    add_model_args(p, default_model=None, default_method=DEFAULT_METHOD)
    p.add_argument("--show-layers", type=_int_list, metavar="I,J,...", help="0-based blocks to draw")
    p.add_argument("--output", "-o", default="vis.png", help="PNG to write (default: vis.png)")
    p.set_defaults(func=cmd_visualize)
    return p


def cmd_visualize(args: argparse.Namespace) -> int:
    """Build the model, apply the method (its default strength for the model, or solved for
    ``--target-gmacs``), draw."""
    name = args.model or EMBEDDED_MODEL
    if is_no_method(args.method):
        raise VitrimError(f"visualize needs a method; accepted: {', '.join(api.methods())}")
    writable_file(args.output, "picture", PICTURE_FORMATS)  # before the model is built
    pretrained = args.pretrained or (is_digits_model(name) and not args.checkpoint)
    state = state_dict_of(read_checkpoint(args.checkpoint), args.checkpoint) if args.checkpoint else None
    model = create_model(name, pretrained=pretrained, img_size=args.img_size).eval()
    api.apply(model, args.method, **method_options(args))
    method = api.get_method(model)
    if state is not None:  # after apply: a fine-tuned reduced model's checkpoint carries the method's weights
        load_checkpoint(model, state, path=args.checkpoint)
    elif any(True for _ in method.parameters()):
        print(f"note: {method.name} has learned parts (score predictors) and no --checkpoint was given: they are "
              f"untrained, so the picture shows random decisions; pass the best.pt of a `vitrim train` run",
              file=sys.stderr)
    path = visualize(model, args.output, args.image, args.show_layers, model_name=name)
    print(f"wrote {path}: {name} + {method.name} {method.extra_repr()}")
    return 0

