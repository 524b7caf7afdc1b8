"""Token-reduction methods, one file each. Every module in this package is imported here, so a
new ``methods/<name>.py`` with a ``@register_method`` class is available without further edits."""
import importlib
import pkgutil

from .base import BlockTokens, ModelInfo, ReductionMethod, get_method_class, method_names, register_method
from .tome import ToMe, parse_schedule

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base",):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BlockTokens", "ModelInfo", "ReductionMethod", "ToMe", "get_method_class", "method_names",
           "parse_schedule", "register_method"]
