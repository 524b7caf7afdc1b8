"""Budgets: the option values of a method that meet a GMACs or speed-up target.

``vitrim.solve(model, "tome", target_gmacs=3.0)`` searches the method's strength option (its
``strength`` and ``strength_grid``: ToMe a constant ``r`` per block; the keep-rate methods
``keep_rate`` on a 0.01 grid) and prices each candidate with the model's cost plan
(``Adapter.cost_plan``), so nothing is guessed, no forward is run and the user's model is never
touched (a ``torch.device("meta")`` model works).

What "meets the budget most closely" means (``rule``):

* ``"nearest"`` (default for ``target_gmacs``): the setting whose analytic GMACs is nearest to the
  target (absolute difference; ties go to the weaker reduction). DeiT-S at 2.7 GMACs gives ToMe
  ``r=13`` (2.703 GMACs), the published setting.
* ``"within"`` (default for ``target_speedup``): the weakest reduction that stays within the
  budget: GMACs ``<=`` target, or measured speed-up ``>=`` target.

A target outside what the method can reach (below its strongest setting, or above the unreduced
model's GMACs / a speed-up below 1) raises :class:`~vitrim.errors.OptionError` naming the range.
``target_speedup`` is measured on this machine with :func:`vitrim.measure.bench.benchmark`
(unreduced and reduced side by side), bisecting over the candidates ordered by GMACs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .adapters import attach, bind, get_adapter, is_reduced, resolve_img_size
from .checks import positive_int, resolve_device
from .errors import OptionError
from .measure.bench import benchmark
from .methods.base import get_method_class

__all__ = ["Candidate", "solve", "candidates", "strength_option"]

RULES = ("nearest", "within")
_RANGE_TOL = 0.01  # relative slack at the ends of the reachable range


@dataclass(frozen=True)
class Candidate:
    """One setting of a method's strength option and its analytic GMACs (batch 1)."""

    options: dict
    gmacs: float


def strength_option(method: str) -> str:
    """The option a budget sets (the method's ``strength``: ``r`` for ToMe, ``keep_rate`` for the others)."""
    cls = get_method_class(method)
    if cls.strength is None:
        raise OptionError(f"method {cls.name!r} has no strength option a budget can set; accepted methods: tome "
                          f"and those with a keep_rate")
    return cls.strength


def _img_size(model: nn.Module, img_size: Optional[int]) -> tuple[int, int]:
    return resolve_img_size(model, img_size)


def _gmacs(adapter, size: tuple[int, int], method) -> float:
    return adapter.cost_plan(size, method).gmacs


def candidates(model: nn.Module, method: str, img_size: Optional[int] = None,
               **fixed: Any) -> list[Candidate]:
    """Every searched setting of ``method`` on ``model`` with its GMACs, weakest first.

    ``fixed`` holds other options kept as given (e.g. ``locations=(3, 6, 9)``). Settings the method
    rejects are skipped; of settings with equal GMACs only the weakest is kept. The model itself
    is not changed: each setting is priced with the adapter's cost plan.
    """
    if is_reduced(model):
        raise OptionError("solve needs the unreduced model; call vitrim.remove(model) first")
    key = strength_option(method)
    if key in fixed:
        raise OptionError(f"{key} is what the budget solves for; do not pass it together with a target")
    adapter, reducer = bind(model, method, **fixed)
    size = _img_size(model, img_size)
    out: list[Candidate] = []
    for value in type(reducer).strength_grid(adapter.info()):
        try:
            reducer.update(**{key: value})
            g = _gmacs(adapter, size, reducer)
        except (OptionError, ValueError):
            continue
        if out and abs(g - out[-1].gmacs) < 1e-12:
            continue
        if out and g > out[-1].gmacs:  # not monotone: keep the search honest, skip it
            continue
        out.append(Candidate({**fixed, key: value}, g))
    if not out:
        raise OptionError(f"no valid setting of {key} for method {method!r} on this model")
    return out


def _unreduced_gmacs(model: nn.Module, img_size: Optional[int]) -> float:
    return _gmacs(get_adapter(model), _img_size(model, img_size), None)


def _check_rule(rule: Optional[str], default: str) -> str:
    rule = rule or default
    if rule not in RULES:
        raise OptionError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    return rule


def _solve_gmacs(cands: list[Candidate], base: float, target: float, rule: str, method: str) -> Candidate:
    lo, hi = cands[-1].gmacs, max(base, cands[0].gmacs)
    if not (lo * (1 - _RANGE_TOL) <= target <= hi * (1 + _RANGE_TOL)):
        raise OptionError(f"target_gmacs={target} is unreachable with {method!r} on this model: its settings span "
                          f"{lo:.4f} to {hi:.4f} GMACs (accepted: targets in that range)")
    if rule == "within":
        fit = [c for c in cands if c.gmacs <= target]
        if not fit:
            raise OptionError(f"no {method!r} setting has GMACs <= {target} (lowest: {lo:.4f})")
        return fit[0]
    return min(cands, key=lambda c: abs(c.gmacs - target))  # min keeps the first (weakest) on ties


def _measure_speedup(base: nn.Module, method: str, options: dict, batch_size: int, device: torch.device,
                     input_size: tuple[int, int, int], repeats: int) -> float:
    reduced = copy.deepcopy(base)
    attach(reduced, method, **options)
    reduced.to(device)
    res = benchmark({"unreduced": base, "reduced": reduced}, batch_size=batch_size, input_size=input_size,
                    device=device, warmup=2, repeats=repeats, iters=2)
    return res.timings[1].speedup


def _solve_speedup(model: nn.Module, cands: list[Candidate], method: str, target: float, rule: str,
                   batch_size: int, device: Optional[str], img_size: Optional[int], repeats: int) -> Candidate:
    if target < 1.0:
        raise OptionError(f"target_speedup={target} is below 1 (the unreduced model); accepted: >= 1")
    dev = resolve_device(device)
    h, w = _img_size(model, img_size)
    model = model.to(dev).eval()
    measured: dict[int, float] = {}

    base_gmacs = _unreduced_gmacs(model, img_size)

    def speed(i: int) -> float:
        if i == 0 and abs(cands[0].gmacs - base_gmacs) < 1e-12:
            return 1.0  # the weakest setting computes as the model itself
        if i not in measured:
            measured[i] = _measure_speedup(model, method, cands[i].options, batch_size, dev, (3, h, w), repeats)
        return measured[i]

    last = len(cands) - 1
    if speed(last) < target:
        raise OptionError(f"target_speedup={target} is unreachable with {method!r} here: its strongest setting "
                          f"{cands[last].options} measures {speed(last):.2f}x at batch {batch_size} on {dev}")
    lo, hi = 0, last  # invariant: speed(hi) >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if speed(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if rule == "nearest" and hi > 0 and (hi - 1) in measured:
        if abs(speed(hi - 1) - target) < abs(speed(hi) - target):
            return cands[hi - 1]
    return cands[hi]


def solve(model: nn.Module, method: str, *, target_gmacs: Optional[float] = None,
          target_speedup: Optional[float] = None, rule: Optional[str] = None, img_size: Optional[int] = None,
          batch_size: int = 32, device: Optional[str] = None, repeats: int = 3, **fixed: Any) -> dict:
    """Option values of ``method`` on ``model`` that meet one budget most closely.

    Args:
        model: an unreduced supported model (weights may be on ``meta`` for ``target_gmacs``).
        method: a method name (``vitrim.methods()``).
        target_gmacs: analytic GMACs at batch 1 (the papers' convention).
        target_speedup: throughput ratio to the unreduced model, measured here with ``benchmark()``.
        rule: ``"nearest"`` or ``"within"`` (see the module docstring); default: ``"nearest"`` for
            GMACs, ``"within"`` for speed-up.
        img_size: input resolution (default: the model's own).
        batch_size, device, repeats: the speed-up measurement's settings.
        **fixed: other options of the method, kept as given (e.g. ``locations=(3, 6, 9)``).

    Returns:
        The options to pass to ``vitrim.apply`` (``fixed`` plus ``r`` or ``keep_rate``).

    Example:
        >>> with torch.device("meta"):
        ...     model = timm.create_model("deit_small_patch16_224")
        >>> vitrim.solve(model, "tome", target_gmacs=2.7)
        {'r': 13}
    """
    if (target_gmacs is None) == (target_speedup is None):
        raise OptionError("give exactly one budget: target_gmacs=... or target_speedup=...")
    target = target_gmacs if target_gmacs is not None else target_speedup
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise OptionError(f"the budget must be a positive number, got {target!r}")
    if target_speedup is not None:  # the measurement's settings, checked before any candidate is built
        device = resolve_device(device)
        positive_int(batch_size, "batch_size")
        positive_int(repeats, "repeats")
    cands = candidates(model, method, img_size, **fixed)
    if target_gmacs is not None:
        best = _solve_gmacs(cands, _unreduced_gmacs(model, img_size), float(target_gmacs),
                            _check_rule(rule, "nearest"), method)
    else:
        best = _solve_speedup(model, cands, method, float(target_speedup), _check_rule(rule, "within"),
                              batch_size, device, img_size, repeats)
    return dict(best.options)
