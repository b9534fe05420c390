"""Errors that seqgen raises on purpose.

Every error names the object, the cause and the fix. The CLI prints them without a traceback and exits with the
error's ``exit_code`` (the README's table lists them); anything else that escapes is a bug in seqgen and keeps its
traceback.
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
    "BadInput",
    "MissingInput",
    "OutputRefused",
    "NumericalError",
    "OutOfMemory",
]


class SeqgenError(Exception):
    """Base class: a problem the user can fix; the message says how."""

    exit_code = 1


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


class BadInput(SeqgenError):
    """An input file is unreadable as what it should be: a truncated or corrupt checkpoint, a tokenizer-less
    checkpoint, data that is not UTF-8 text (``EX_DATAERR``)."""

    exit_code = 65


class MissingInput(BadInput):
    """A file an input names (a checkpoint shard its index lists) is not there (``EX_NOINPUT``)."""

    exit_code = 66


class OutputRefused(SeqgenError):
    """An output directory cannot be written as asked: it would replace the input or someone's files, it is not
    writable, or another run wrote it first (``EX_CANTCREAT``)."""

    exit_code = 73


class NumericalError(SeqgenError):
    """Calibration met values it cannot work with: NaN or inf in activations, a Hessian that no dampening makes
    positive definite."""

    exit_code = 3


class OutOfMemory(SeqgenError):
    """The execution device ran out of memory in a subgraph."""

    exit_code = 4
