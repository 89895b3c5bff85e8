"""The errors a user can fix, and the optional extras.

Every command turns a :class:`UserError` into one line, ``fan <command>: error: <message>``, and exit status 2
(``fan.cli.main``); anything else is a bug and keeps its traceback. Both classes subclass the built-in error a
library caller would expect (``ValueError``, ``FileNotFoundError``).
"""
import importlib
from types import ModuleType

__all__ = ['UserError', 'MissingPathError', 'require_extra']


class UserError(ValueError):
    """Bad input: unknown model, unreadable or unfitting checkpoint, incomplete dataset, bad option value."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or holds nothing usable)."""


def require_extra(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise a :class:`UserError` that names the ``pip install 'fan[extra]'`` to run."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(f"{module} is not installed ({error.msg}): pip install 'fan[{extra}]'") from None
