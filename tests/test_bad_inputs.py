"""Inputs that must end in one message naming the file and the fix, with no traceback and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from seqgen.cli import cli
from seqgen.data import load_texts
from seqgen.errors import SeqgenError
from seqgen.models import tiny_model

CASES = {
    "binary.txt": (b"fine text\n\x89PNG\r\n\x1a\n\x00\x00", r"binary\.txt:2:1 is not UTF-8 text \(byte 0x89\)"),
    "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), r"latin1\.jsonl:1:14 is not UTF-8 text \(byte 0xe9\)"),
    "nul.txt": (b"one\n\ntwo\x00three\n", r"nul\.txt:3 holds a NUL character"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_data_files_that_are_not_utf8_text_are_refused_with_their_position(tmp_path: Path, name: str) -> None:
    data, message = CASES[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SeqgenError, match=message):
        load_texts(tmp_path / name)


def test_calibrate_refuses_a_binary_dataset_before_loading_weights(
    tmp_path: Path, smollm2_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    import seqgen.models

    checkpoint = tmp_path / "model"
    tiny_model("llama", vocab_size=49152).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(checkpoint)
    monkeypatch.setattr(seqgen.models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    data, message = CASES["binary.txt"]
    (tmp_path / "binary.txt").write_bytes(data)
    save = tmp_path / "out"
    args = ["calibrate", "--model", str(checkpoint), "--dataset", str(tmp_path / "binary.txt"), "--save", str(save)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 65, result.output  # BadInput
    assert "is not UTF-8 text (byte 0x89)" in result.output and "Traceback" not in result.output
    assert not save.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "model"]
