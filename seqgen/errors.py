"""Errors that seqgen raises on purpose.

Every error names the object, the cause and the fix. The CLI prints them without a traceback and exits non-zero;
anything else that escapes is a bug in seqgen and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "SeqgenError",
    "TraceFailure",
    "EmitFailure",
    "PackageError",
    "IntegrityError",
    "FingerprintMismatch",
    "GuardError",
]


class SeqgenError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class TraceFailure(SeqgenError):
    """The model could not be traced as it is."""


class EmitFailure(SeqgenError):
    """A traced graph could not be written as a package."""


class PackageError(SeqgenError):
    """A package directory is missing, malformed, or from an unsupported schema."""


class IntegrityError(PackageError):
    """A package file or its index changed since it was written or accepted."""


class FingerprintMismatch(PackageError):
    """A package was emitted for another model, config, library version or option set."""


class GuardError(SeqgenError):
    """A batch breaks a control-flow decision that was frozen when the package was emitted."""
