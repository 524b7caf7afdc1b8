"""``vitrim compare``: the command line of :func:`vitrim.compare.compare`."""
from __future__ import annotations

import argparse

from ..compare import compare, parse_sweep, terminal_table, untrained_methods
from ..compare.report import extension_notes, skipped_note
from ..methods.base import registered_methods

__all__ = ["add_compare_parser", "cmd_compare"]


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_compare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vitrim compare``."""
    p = subparsers.add_parser(
        "compare", help="every method at a sweep of strengths vs the unreduced model: GMACs, speed, top-1",
        description="Measure the unreduced model and each method at several strengths side by side; write "
                    "results.csv, results.md and accuracy-vs-GMACs / accuracy-vs-throughput plots. With no "
                    "arguments: the embedded model on the digits validation split.")
    p.add_argument("--model", help="timm model name (default: the embedded vitrim_vit_digits; vitrim's other digits models, "
                   "vitrim_eva_digits and vitrim_siglip_digits, also run out of the box on their shipped weights)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    p.add_argument("--checkpoint", action="append", metavar="[METHOD:VALUE=]PATH",
                   help="PATH: the model's weights; METHOD:VALUE=PATH: a fine-tuned row, e.g. "
                        "idle:0.7=runs/x/best.pt (repeatable)")
    p.add_argument("--data", help="ImageFolder root or its val/ folder (default for vitrim's digits models: the digits canvases)")
    p.add_argument("--methods", type=_csv_list, default=None,
                   help=f"comma-separated methods (default: every one that can reduce the model: "
                        f"{','.join(c.name for c in registered_methods())})")
    p.add_argument("--sweep", help="strengths per method, e.g. 'tome:r=8,13,16;evit:keep_rate=0.9,0.7' "
                                   "(default: ToMe r at 0.5/0.8/1.0 of patches//depth, keep rates 0.9/0.7/0.5)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16],
                   help="throughput batch sizes; 1 is always included (default: 1 16)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; median reported (default: 5)")
    p.add_argument("--iters", type=int, default=2, help="forwards per repetition (default: 2)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, help="evaluate on this many evenly spaced images")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes (default: 0)")
    p.add_argument("--output", "-o", default="compare", help="report folder (default: ./compare)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    """``vitrim compare``: run :func:`compare`, print the table and the written paths."""
    result = compare(args.model, args.methods, data=args.data, pretrained=args.pretrained,
                     checkpoints=args.checkpoint, sweeps=parse_sweep(args.sweep), batch_sizes=args.batch_size,
                     img_size=args.img_size, device=args.device, warmup=args.warmup, repeats=args.repeats,
                     iters=args.iters, eval_batch_size=args.eval_batch_size, max_images=args.max_images,
                     workers=args.workers, output=args.output,
                     progress=not args.no_progress)
    print(terminal_table(result))
    untrained = untrained_methods(result)
    if untrained:
        print(f"* {', '.join(untrained)}: untrained score predictors, top-1 needs fine-tuning (vitrim train)")
    for note in extension_notes(result):
        print(f"* {note}")
    if result.skipped:
        print(f"* {skipped_note(result)}")
    for kind, path in result.paths.items():
        print(f"wrote {path}")
    return 0

