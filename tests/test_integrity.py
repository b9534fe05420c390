"""Integrity: edited files are refused until accepted, any changed byte of the index is refused,
and a package never runs a model it was not emitted for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import seqgen
from seqgen.cli import cli
from seqgen.emitter import emit_model
from seqgen.index import SCHEMA_VERSION, compute_fingerprint, dump_index, fingerprint_fields
from seqgen.models import meta_model, tiny_model
from seqgen.verify import random_batch


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    return emit_model(meta_model("tiny:llama"), tmp_path / "pkg").path


def test_edited_file_is_refused_then_accepted_and_runs(package: Path) -> None:
    target = package / "subgraph_003.py"  # the tail: an edit of the logits shows in the package's output
    source = target.read_text()
    edited = source.replace("    return {", "    logits = logits * 2.0  # reviewed hand edit\n    return {")
    assert edited != source
    target.write_text(edited)
    with pytest.raises(seqgen.IntegrityError, match=r"subgraph_003\.py changed since it was emitted"):
        seqgen.load(package)

    result = CliRunner().invoke(cli, ["accept", str(package)])
    assert result.exit_code == 0 and "subgraph_003.py" in result.output
    pkg = seqgen.load(package)
    assert pkg.edited_files == ("subgraph_003.py",)
    model = tiny_model("llama")
    batch = random_batch(99, 2, 16)
    with torch.no_grad():  # doubling is exact in floating point: the edited code ran, and only it changed anything
        assert torch.equal(pkg.run(model, **batch)["logits"], model(**batch).logits * 2.0)
    shown = CliRunner().invoke(cli, ["show", str(package)])
    assert "edited (accepted by hand): subgraph_003.py" in shown.output


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
    with pytest.raises(seqgen.IntegrityError, match=r"index\.json was modified after it was written"):
        seqgen.load(package)


def _replace_constant(file: Path, constant: str, value: str) -> None:
    lines = file.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{constant} = "))
    lines[at] = f"{constant} = {value}\n"
    file.write_text("".join(lines))


@pytest.mark.parametrize(
    ("constant", "value"),
    [
        ("INPUTS", '("hidden_states", "causal_mask", "position_ids")'),
        ("OUTPUTS", '("hidden_states", "causal_mask")'),
        ("CONSUMED", "()"),
        ("TARGETS", '("model.layers.0",)'),
    ],
)
def test_header_constant_that_differs_from_the_index_is_refused(package: Path, constant: str, value: str) -> None:
    file = package / "subgraph_002.py"
    _replace_constant(file, constant, value)
    seqgen.accept(package)  # the hash is trusted: only the header check can catch the changed interface
    with pytest.raises(seqgen.PackageError, match=rf"subgraph_002\.py declares {constant} = .* but the index says"):
        seqgen.load(package)


def test_missing_header_constant_is_refused(package: Path) -> None:
    file = package / "subgraph_001.py"
    file.write_text(file.read_text().replace("CONSUMED = ", "KEPT = "))
    seqgen.accept(package)
    with pytest.raises(seqgen.PackageError, match=r"subgraph_001\.py has no CONSUMED constant"):
        seqgen.load(package)


def test_index_of_an_older_schema_is_refused_with_a_re_emit_hint(package: Path) -> None:
    index = json.loads((package / "index.json").read_text())
    index["schema_version"] = SCHEMA_VERSION - 1
    (package / "index.json").write_text(dump_index(index))
    with pytest.raises(
        seqgen.PackageError, match=r"schema_version 1, written by another seqgen.*seqgen emit .*--force"
    ):
        seqgen.load(package)


def test_index_stores_each_fact_once(package: Path) -> None:
    index = json.loads((package / "index.json").read_text())
    assert set(index["fingerprint"]) == {"digest", "config", "source"}
    # the stored digest is the one the model gives now, from the facts stored once at the top level
    fresh = compute_fingerprint(
        meta_model("tiny:llama"),
        options=fingerprint_fields(index)["options"],
        inputs=fingerprint_fields(index)["inputs"],
        source_modules=list(index["fingerprint"]["source"]),
    )
    assert fresh["digest"] == index["fingerprint"]["digest"] and fresh["fields"] == fingerprint_fields(index)
    assert index["options"]["sample_shape"] == [2, 64] and [s["shape"] for s in index["inputs"]] == [[2, 64]] * 2


def test_each_input_names_the_subgraph_that_produced_it(package: Path) -> None:
    index = json.loads((package / "index.json").read_text())
    names = [sg["name"] for sg in index["subgraphs"]]
    package_inputs = [spec["name"] for spec in index["inputs"]]
    for position, sg in enumerate(index["subgraphs"]):
        header = (package / sg["file"]).read_text()
        for value, producer in sg["inputs"].items():
            if producer == "model input":
                assert value in package_inputs
                assert "# Model inputs: " in header
            else:
                assert (
                    names.index(producer) < position and value in index["subgraphs"][names.index(producer)]["outputs"]
                )
                assert f"# Inputs from {producer}: " in header and value in header
    assert index["subgraphs"][2]["inputs"]["hidden_states"] == "subgraph_001"
    assert index["subgraphs"][2]["inputs"]["causal_mask"] == "subgraph_000"


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
