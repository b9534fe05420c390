"""generated/ is the golden set: regenerating it with the documented command changes no byte."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import black
import pytest
from click.testing import CliRunner
from conftest import REPO

from seqgen.cli import cli
from seqgen.emitter import BLACK_MODE

GOLDEN = {"tiny-llama": "tiny:llama", "smollm2-135m": "smollm2-135m"}  # the same as `make generated`


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_regenerating_changes_no_byte(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    result = CliRunner().invoke(cli, ["emit", GOLDEN[name], str(out)])
    assert result.exit_code == 0, result.output
    golden = REPO / "generated" / name
    expected = sorted(p.name for p in golden.iterdir() if p.is_file())
    assert sorted(p.name for p in out.iterdir()) == expected
    for file in expected:
        assert (out / file).read_text() == (
            golden / file
        ).read_text(), f"generated/{name}/{file} is stale: refresh it with `make generated` and review the diff"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_files_pass_black_and_import_alone(name: str) -> None:
    for path in sorted((REPO / "generated" / name).glob("*.py")):
        source = path.read_text()
        with pytest.raises(black.NothingChanged):
            black.format_file_contents(source, fast=False, mode=BLACK_MODE)
        spec = importlib.util.spec_from_file_location(f"golden_{name.replace('-', '_')}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if path.stem.startswith("subgraph_"):
            assert callable(module.forward)
            assert isinstance(module.INPUTS, tuple) and isinstance(module.TARGETS, tuple)
