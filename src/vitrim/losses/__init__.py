"""Training losses of the papers, as plain functions (one file per family; all re-exported here).

``distill.py``: KL logit distillation shared by every method's recipe; method-specific terms
(keep-ratio, token distillation, token cut, feature MSE) live in their own files.
"""
import importlib
import pkgutil

from .distill import kl_logit_distillation

__all__ = ["kl_logit_distillation"]

for _info in pkgutil.iter_modules(__path__):
    _mod = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_mod, "__all__", ()):
        globals()[_name] = getattr(_mod, _name)
        if _name not in __all__:
            __all__.append(_name)
