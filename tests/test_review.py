"""Review without running: `seqgen show` and `seqgen diff` read packages as text; indexes name only their own files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import seqgen
from seqgen.cli import cli
from seqgen.errors import PackageError
from seqgen.index import INDEX_NAME, dump_index

REPO = Path(__file__).resolve().parents[1]
# An edit that would leave a trace if the file were ever imported.
SIDE_EFFECT = "\nimport pathlib\n\npathlib.Path(__file__).with_name('IMPORTED').touch()\n"


@pytest.fixture
def package(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llama"
    shutil.copytree(REPO / "generated" / "tiny-llama", path)
    return path


def test_show_reads_an_edited_package_without_importing_it(package: Path) -> None:
    with (package / "subgraph_002.py").open("a") as f:
        f.write(SIDE_EFFECT)
    (package / "subgraph_001.py").unlink()
    result = CliRunner().invoke(cli, ["show", str(package)])
    assert result.exit_code == 0, result.output
    assert not (package / "IMPORTED").exists()
    assert "changed since the index was written" in result.output and "subgraph_002.py" in result.output
    assert "missing: subgraph_001.py" in result.output


def test_show_groups_layers_with_one_body() -> None:
    result = CliRunner().invoke(cli, ["show", str(REPO / "generated" / "smollm2-135m")])
    assert result.exit_code == 0, result.output
    # layer 0 reads the embeddings and layer 29 is the last to read the masks: the 28 between share one body
    assert "subgraph_002-029: model.layers.1-28, one body" in result.output
    assert "subgraph_001: model.layers.0\n" in result.output and "subgraph_030: model.layers.29\n" in result.output


@pytest.mark.parametrize("name", ["../evil.py", "/tmp/evil.py", "sub/evil.py", ".."])
def test_an_index_naming_a_file_outside_its_package_is_refused(package: Path, name: str) -> None:
    """A forged index whose digest was recomputed still cannot make the loader import a file of another directory."""
    (package.parent / "evil.py").write_text(SIDE_EFFECT)
    index = json.loads((package / INDEX_NAME).read_text())
    index["subgraphs"][1]["file"] = name
    (package / INDEX_NAME).write_text(dump_index(index))
    message = rf"lists the file '{name}', which is not a file of the package directory"
    with pytest.raises(PackageError, match=message):
        seqgen.load(package)
    result = CliRunner().invoke(cli, ["show", str(package)])
    assert result.exit_code == 1 and "not a file of the package directory" in result.output
    assert not (package.parent / "IMPORTED").exists()


def test_an_index_naming_a_link_out_of_its_package_is_refused(package: Path) -> None:
    (package.parent / "evil.py").write_text(SIDE_EFFECT)
    (package / "subgraph_001.py").unlink()
    (package / "subgraph_001.py").symlink_to(package.parent / "evil.py")
    with pytest.raises(PackageError, match="'subgraph_001.py', which is not a file of the package directory"):
        seqgen.load(package)
    assert not (package.parent / "IMPORTED").exists()


def test_diff_exits_0_when_same_1_with_the_changes_2_on_errors(package: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    same = runner.invoke(cli, ["diff", str(REPO / "generated" / "tiny-llama"), str(package)])
    assert same.exit_code == 0 and "are the same package" in same.output
    text = (package / "subgraph_003.py").read_text().replace('{"logits": logits}', '{"logits": logits * 2}')
    (package / "subgraph_003.py").write_text(text)
    changed = runner.invoke(cli, ["diff", str(REPO / "generated" / "tiny-llama"), str(package)])
    assert changed.exit_code == 1, changed.output
    assert "subgraphs: 1 files changed, 0 added, 0 removed" in changed.output
    assert '-    return {"logits": logits}\n+    return {"logits": logits * 2}' in changed.output
    (tmp_path / "empty").mkdir()
    broken = runner.invoke(cli, ["diff", str(package), str(tmp_path / "empty")])
    assert broken.exit_code == 2 and "is not a seqgen package" in broken.output


def test_diff_against_a_model_shows_fingerprint_fields_and_files(tmp_path: Path) -> None:
    """Comparing a package with another model emitted now names the fields that differ and diffs the files."""
    result = CliRunner().invoke(cli, ["diff", str(REPO / "generated" / "tiny-llama"), "--model", "tiny:llama"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["diff", str(REPO / "generated" / "tiny-llama"), "--model", "tiny:mistral"])
    assert result.exit_code == 1, result.output
    assert "fingerprint model_class: LlamaForCausalLM -> MistralForCausalLM" in result.output
    assert "fingerprint source.transformers.models.mistral.modeling_mistral: - -> " in result.output
    assert "+++ tiny:mistral now/subgraph_001.py" in result.output
