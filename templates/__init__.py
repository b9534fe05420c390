"""Jinja2 skeletons of the files seqgen generates (shipped with the package as ``seqgen.templates``)."""
