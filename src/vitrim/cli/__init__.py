"""``vitrim`` command line: ``compare``, ``bench``, ``flops``, ``train``, ``eval``, ``visualize``, ``export``,
``data``, ``methods``, ``recipes``.

Method options are given as ``--<option> VALUE`` with Python literal values, e.g.
``--method tome --r 13``, ``--r "(16, -1)"``, ``--r "[25, 25, 25]"``, ``--prop-attn False``.
One module per group of subcommands; what they share is :mod:`vitrim.cli.common`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..errors import VitrimError
from ..methods.base import registered_methods
from ..version import __version__
from .compare import add_compare_parser
from .export import add_export_parser
from .measure import add_measure_parsers
from .train import add_train_parsers
from .visualize import add_visualize_parser

__all__ = ["main", "build_parser"]


def cmd_methods(args: argparse.Namespace) -> int:
    """Each method: what it does, its options with their defaults."""
    for cls in registered_methods():
        aliases = f" (also: {', '.join(cls.aliases)})" if cls.aliases else ""
        print(f"{cls.name}{aliases}: {cls.describe()}")
        opts = ", ".join(f"{k}={v!r}" for k, v in cls.option_defaults().items())
        print(f"    options: {opts or 'none'}")
    print("Rules and options: docs/methods/*.md; `vitrim <command> --help` lists each option and its methods.")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """Each training recipe and what it sets."""
    from ..train.recipes import RECIPES

    for name in sorted(RECIPES):
        print(f"{name:<16} {RECIPES[name].description}")
    print("Values and sources: docs/training.md; override any field with --set key=value.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrim", description="Token reduction for Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"vitrim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compare_parser(sub)
    add_measure_parsers(sub)
    p = sub.add_parser("methods", help="list the methods: what each does and its options")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("recipes", help="list the training recipes and what each sets")
    p.set_defaults(func=cmd_recipes)
    add_train_parsers(sub)
    add_export_parser(sub)
    add_visualize_parser(sub)
    return parser


def _load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise VitrimError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise VitrimError(f"config file {path!r} is not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError:
        raise VitrimError(f"config file {path!r} is not a text file; accepted: a YAML mapping of option: value") from None
    if not isinstance(data, dict):
        raise VitrimError(f"config file {path!r} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _merge_config(args: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """Values from ``--config FILE`` fill in every option not given on the command line."""
    data = _load_yaml(args.config)
    for k, v in (data.pop("method_options", None) or {}).items():
        data[f"opt_{k}"] = v
    unknown = sorted(k for k in data if k not in vars(args))
    if unknown:
        raise VitrimError(f"config {args.config!r}: unknown option(s) {', '.join(unknown)}")
    given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    for k, v in data.items():
        if k not in given and (k[4:] if k.startswith("opt_") else k) not in given:
            setattr(args, k, v)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``vitrim`` command; exit 0, 2 for a bad input (a one-line message), 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = _merge_config(args, argv)
        return args.func(args)
    except (VitrimError, ValueError) as err:
        print(f"vitrim: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitrim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`vitrim methods | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
