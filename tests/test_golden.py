"""generated/ is the golden set: regenerating it with the documented command changes no byte, and every file passes
black under its default settings, as a user's repository would run it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import black
import pytest
from click.testing import CliRunner
from conftest import REPO

from seqgen.cli import cli

# the same as `make generated`; GPT-2 has guards, tuple constants and leaf imports
GOLDEN = {"tiny-llama": "tiny:llama", "smollm2-135m": "smollm2-135m", "tiny-gpt2": "tiny:gpt2"}


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
    for path in sorted(out.glob("*.py")):  # emitted outside the repository: black's defaults, not the project's
        source = path.read_text()
        assert black.format_str(source, mode=black.Mode()) == source, f"{path.name} is not black-clean"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_files_pass_black_and_import_alone(name: str) -> None:
    for path in sorted((REPO / "generated" / name).glob("*.py")):
        source = path.read_text()
        with pytest.raises(black.NothingChanged):
            black.format_file_contents(source, fast=False, mode=black.Mode())
        spec = importlib.util.spec_from_file_location(f"golden_{name.replace('-', '_')}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if path.stem.startswith("subgraph_"):
            assert callable(module.forward)
            assert isinstance(module.INPUTS, tuple) and isinstance(module.TARGETS, tuple)
