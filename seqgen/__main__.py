"""``python -m seqgen`` (torchrun starts it this way)."""

from .cli import main

main()
