"""All terminal output of the CLI goes through these two helpers (the library itself only logs)."""

from __future__ import annotations

import click

__all__ = ["out", "err"]


def out(message: str, **styles: object) -> None:
    """A result line, on stdout."""
    click.secho(message, **styles)  # type: ignore[arg-type]


def err(message: str, **styles: object) -> None:
    """A diagnostic line, on stderr."""
    click.secho(message, err=True, **styles)  # type: ignore[arg-type]
