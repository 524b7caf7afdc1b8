"""What ``vitrim compare`` measures: one :class:`Row` per configuration, and the whole run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Row", "CompareResult"]


@dataclass
class Row:
    """One measured configuration."""

    method: str                       # "none" for the unreduced model
    options: dict
    weights: str                      # "off-the-shelf", "shipped fine-tune", "untrained" or the checkpoint path
    gmacs: float
    params_m: float
    top1: Optional[float] = None
    top5: Optional[float] = None
    img_per_s: dict = field(default_factory=dict)   # batch size -> median img/s
    speedup: dict = field(default_factory=dict)     # batch size -> ratio to the unreduced model
    latency_ms: Optional[float] = None              # batch 1, median ms per image
    untrained: bool = False                         # learned parts (predictors) left randomly initialised
    extensions: tuple = ()                          # rules not from the method's paper used here [vitrim extension]

    @property
    def setting(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items()) or "-"

    @property
    def name(self) -> str:
        return "unreduced" if self.method == "none" else f"{self.method} {self.setting}"


@dataclass
class CompareResult:
    rows: list[Row]
    batch_sizes: list[int]
    paths: dict                       # "csv", "md", "html", "plot_*" -> path
    env: dict
    images: int = 0
    pictures: dict = field(default_factory=dict)   # method -> (setting, PNG path): what it did to one image
    skipped: dict = field(default_factory=dict)    # method -> why it was left out of the default list
