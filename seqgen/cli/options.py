"""Options that several commands share."""

from __future__ import annotations

import click

__all__ = ["revision_option", "trust_remote_code_option"]

revision_option = click.option(
    "--revision",
    default=None,
    help="Of a hub model id: the branch, tag or commit to use (default: main).",
)

trust_remote_code_option = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Run the model's own configuration and modeling code (auto_map in its config.json); read it first.",
)
