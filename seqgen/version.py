"""The seqgen version, written into every generated file and package index."""

__version__ = "0.1.0"
