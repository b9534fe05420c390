"""Integrity: edited files are refused until accepted, any changed byte of the index is refused,
and a package never runs a model it was not emitted for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import seqgen
from seqgen.cli import cli
from seqgen.emitter import emit_model
from seqgen.models import meta_model, tiny_model
from seqgen.verify import random_batch


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    return emit_model(meta_model("tiny:llama"), tmp_path / "pkg").path


def test_edited_file_is_refused_then_accepted(package: Path) -> None:
    target = package / "subgraph_001.py"
    source = target.read_text()
    edited = source.replace(
        "    return {", "    hidden_states = hidden_states * 1.0  # reviewed hand edit\n    return {"
    )
    assert edited != source
    target.write_text(edited)
    with pytest.raises(seqgen.IntegrityError, match="subgraph_001.py"):
        seqgen.load(package)

    result = CliRunner().invoke(cli, ["accept", str(package)])
    assert result.exit_code == 0 and "subgraph_001.py" in result.output
    pkg = seqgen.load(package)
    assert pkg.edited_files == ("subgraph_001.py",)
    model = tiny_model("llama")
    batch = random_batch(99, 2, 16)
    with torch.no_grad():
        assert torch.equal(pkg.run(model, **batch)["logits"], model(**batch).logits)
    shown = CliRunner().invoke(cli, ["show", str(package)])
    assert "edited (accepted by hand): subgraph_001.py" in shown.output


def test_reverting_an_edit_clears_the_edited_mark(package: Path) -> None:
    target = package / "subgraph_002.py"
    original = target.read_text()
    target.write_text(original + "# note\n")
    seqgen.accept(package)
    target.write_text(original)
    assert seqgen.accept(package) == ["subgraph_002.py"]
    assert seqgen.load(package).edited_files == ()


@pytest.mark.parametrize("change", ["hash", "whitespace", "digest", "guard"])
def test_any_changed_byte_of_the_index_is_refused(package: Path, change: str) -> None:
    index = package / "index.json"
    text = index.read_text()
    if change == "hash":
        position = text.index('"sha256": "') + len('"sha256": "')
        text = text[:position] + ("0" if text[position] != "0" else "1") + text[position + 1 :]
    elif change == "whitespace":
        text = text.replace("\n", "\n ", 1)
    elif change == "digest":
        text = text.replace('"digest": "', '"digest": "f', 1)[:-4] + '"\n}\n'
    else:
        text = text.replace('"guards": []', '"guards": [{"kind": "bool"}]', 1)
    index.write_text(text)
    with pytest.raises(seqgen.PackageError):
        seqgen.load(package)


def test_package_refuses_another_model(package: Path) -> None:
    pkg = seqgen.load(package)
    other = tiny_model("llama", hidden_size=48, head_dim=12)
    with pytest.raises(seqgen.FingerprintMismatch, match="config"):
        pkg.run(other, **random_batch(99, 1, 8))
    with pytest.raises(seqgen.FingerprintMismatch, match="model_class"):
        pkg.run(tiny_model("mistral"), **random_batch(99, 1, 8))


def test_missing_input_and_wrong_rank_are_named(package: Path) -> None:
    pkg = seqgen.load(package)
    model = tiny_model("llama")
    with pytest.raises(seqgen.SeqgenError, match="attention_mask"):
        pkg.run(model, input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(seqgen.SeqgenError, match="rank 1"):
        pkg.run(model, input_ids=torch.zeros(4, dtype=torch.long), attention_mask=torch.ones(4, dtype=torch.long))
