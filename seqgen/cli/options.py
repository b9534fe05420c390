"""Options that several commands share."""

from __future__ import annotations

import click

__all__ = ["revision_option"]

revision_option = click.option(
    "--revision",
    default=None,
    help="Of a hub model id: the branch, tag or commit to use (default: main).",
)
