"""Exceptions with messages that say what was wrong and what is accepted."""
from __future__ import annotations

__all__ = ["VitrimError", "OptionError", "UnsupportedModelError", "AlreadyReducedError", "NotReducedError"]


class VitrimError(Exception):
    """Base class of every error vitrim raises on purpose."""


class OptionError(VitrimError, ValueError):
    """A method name or option value that vitrim does not accept."""


class UnsupportedModelError(VitrimError, TypeError):
    """A model (or one of its modules) that no adapter can reduce faithfully."""


class AlreadyReducedError(VitrimError, RuntimeError):
    """``apply`` on a model that already carries a reduction."""


class NotReducedError(VitrimError, RuntimeError):
    """An operation that needs a reduced model got a plain one."""
