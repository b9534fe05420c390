"""``python cli.py ...`` is the ``seqgen`` console script, for a source checkout."""

from seqgen.cli import main

if __name__ == "__main__":
    main()
