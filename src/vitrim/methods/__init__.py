"""Token-reduction methods, one file each. Every module in this package is imported here, so a
new ``methods/<name>.py`` with a ``@register_method`` class is available without further edits
(a method defined outside the package is registered by the same decorator)."""
import importlib
import pkgutil

from ._pruning import parse_keep_rate, parse_locations
from .base import (BlockTokens, ModelInfo, ReductionMethod, TokenMap, get_method_class, method_names,
                   register_method)
from .tome import ToMe, parse_schedule

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base",):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BlockTokens", "ModelInfo", "ReductionMethod", "TokenMap", "ToMe", "get_method_class", "method_names",
           "parse_keep_rate", "parse_locations", "parse_schedule", "register_method"]
