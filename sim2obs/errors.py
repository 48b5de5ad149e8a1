"""Exceptions raised by sim2obs.

Every error subclasses both :class:`Sim2ObsError` (catch everything from this package) and the
matching builtin (``ValueError``, ``FileNotFoundError``, ...), so callers that already handle the
builtin keep working. Messages name the file, the field and the fix.
"""

from __future__ import annotations


class Sim2ObsError(Exception):
    """Base class of every error raised deliberately by sim2obs."""


class Sim2ObsValueError(Sim2ObsError, ValueError):
    """A value (argument, configuration entry, array content) is out of range or malformed."""


class Sim2ObsFileNotFoundError(Sim2ObsError, FileNotFoundError):
    """A required input file or folder does not exist."""


class Sim2ObsDataError(Sim2ObsValueError):
    """An input file exists but its content or layout is not what the reader expects."""


class Sim2ObsKeyError(Sim2ObsError, KeyError):
    """An unknown name (survey, band, method, label) was asked for."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(Sim2ObsError, ImportError):
    """An optional dependency is needed for this feature; the message gives the pip command."""


def require(module: str, extra: str | None = None, package: str | None = None):
    """Import an optional dependency or raise :class:`MissingDependencyError` with the fix.

    ``extra`` names the sim2obs extra that provides it (``pip install "sim2obs[extra]"``),
    ``package`` the PyPI name when it differs from the module name.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pip_name = package or module
        fix = f'pip install "sim2obs[{extra}]"' if extra else f"pip install {pip_name}"
        raise MissingDependencyError(
            f"this feature needs the optional package '{pip_name}' ({exc}). Install it with: {fix}"
        ) from exc
