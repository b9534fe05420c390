"""Corpora, the built-in stdlib corpus, packing into fixed-length samples, batching and padding."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from seqgen.data import (
    CALIBRATION_MODULES,
    HELDOUT_MODULES,
    batches,
    default_texts,
    hub_texts,
    load_texts,
    pack,
    pad_batch,
    resolve_texts,
)
from seqgen.errors import SeqgenError


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer)


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[str]]:
    return {split: default_texts(split) for split in ("calibration", "heldout")}


SHORT_TEXTS = [f"Document number {i} talks about item {i * 7} and nothing else at all." for i in range(40)]


# ---- pack ----------------------------------------------------------------------------------------------------------


def test_pack_shape_dtype_and_eos_between_documents(tokenizer) -> None:
    texts = ["The first document.", "A second one, a little longer than the first."]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    stream = ids[0] + [tokenizer.eos_token_id] + ids[1]
    samples = pack(texts, tokenizer, seq_len=4, num_samples=len(stream) // 4)
    assert samples.dtype == torch.int64 and samples.shape == (len(stream) // 4, 4)
    assert samples.flatten().tolist() == stream[: samples.numel()]
    assert samples.flatten().tolist().count(tokenizer.eos_token_id) == 1


def test_pack_is_deterministic_and_seed_picks_windows(tokenizer) -> None:
    first = pack(SHORT_TEXTS, tokenizer, seq_len=16, num_samples=5, seed=0)
    again = pack(SHORT_TEXTS, tokenizer, seq_len=16, num_samples=5, seed=0)
    other = pack(SHORT_TEXTS, tokenizer, seq_len=16, num_samples=5, seed=1)
    assert first.shape == (5, 16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # every sample is one window of the packed stream, in stream order
    every = pack(SHORT_TEXTS, tokenizer, seq_len=16, num_samples=len(_stream(SHORT_TEXTS, tokenizer)) // 16)
    rows = [tuple(row) for row in every.tolist()]
    positions = [rows.index(tuple(row)) for row in first.tolist()]
    assert positions == sorted(positions)


def _stream(texts: list[str], tokenizer) -> list[int]:
    stream: list[int] = []
    for index, text in enumerate(texts):
        if index:
            stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return stream


def test_pack_too_few_tokens_says_found_and_needed(tokenizer) -> None:
    found = len(_stream(SHORT_TEXTS[:2], tokenizer))
    with pytest.raises(SeqgenError) as info:
        pack(SHORT_TEXTS[:2], tokenizer, seq_len=64, num_samples=10)
    message = str(info.value)
    assert f"{found} tokens" in message and "640" in message


def test_pack_rejects_bad_sizes(tokenizer) -> None:
    with pytest.raises(SeqgenError, match="seq_len"):
        pack(SHORT_TEXTS, tokenizer, seq_len=0, num_samples=1)


# ---- the built-in corpus -------------------------------------------------------------------------------------------


def test_default_splits_read_disjoint_sorted_module_lists() -> None:
    assert list(CALIBRATION_MODULES) == sorted(CALIBRATION_MODULES)
    assert list(HELDOUT_MODULES) == sorted(HELDOUT_MODULES)
    assert not set(CALIBRATION_MODULES) & set(HELDOUT_MODULES)


def test_default_splits_are_disjoint_deterministic_prose(corpora) -> None:
    calibration, heldout = corpora["calibration"], corpora["heldout"]
    assert not set(calibration) & set(heldout)
    assert default_texts("calibration") == calibration
    for text in calibration + heldout:
        assert len(text.split()) >= 30
        assert ">>>" not in text


def test_default_splits_are_large_enough(corpora, tokenizer) -> None:
    calibration = pack(corpora["calibration"], tokenizer, seq_len=512, num_samples=64)
    heldout = pack(corpora["heldout"], tokenizer, seq_len=512, num_samples=40)
    assert calibration.shape == (64, 512) and heldout.shape == (40, 512)


def test_default_texts_unknown_split() -> None:
    with pytest.raises(SeqgenError, match="heldout"):
        default_texts("train")


# ---- load_texts ----------------------------------------------------------------------------------------------------


def test_load_txt_splits_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("First document,\nstill the first.\n\n\n  \nSecond document.\n\nThird.\n", encoding="utf-8")
    assert load_texts(path) == ["First document,\nstill the first.", "Second document.", "Third."]


def test_load_jsonl_text_and_messages(tmp_path: Path, tokenizer) -> None:
    chat = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "Plain text record."}), "", json.dumps({"messages": chat})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    plain, rendered = load_texts(path, tokenizer=tokenizer)
    assert plain == "Plain text record."
    assert rendered == tokenizer.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>user\nWhat is two plus two?<|im_end|>" in rendered

    _, fallback = load_texts(path)  # no tokenizer, hence no chat template
    assert fallback == "user: What is two plus two?\nassistant: Four."


def test_chat_template_kept_with_the_processor_reaches_the_tokenizer(
    tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """Vision-language checkpoints may keep the chat template in the processor's chat_template.json."""
    from seqgen.job import load_tokenizer

    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not load_tokenizer(str(tmp_path)).chat_template

    caplog.set_level("WARNING", logger="seqgen.data")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    assert load_texts(path, load_tokenizer(str(tmp_path))) == ["user: hi"]
    assert "no chat template" in caplog.text

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_texts(path, load_tokenizer(str(tmp_path))) == ["<user>hi"]


def test_job_samples_come_from_the_dataset_file(tmp_path: Path, tokenizer) -> None:
    from seqgen.job import calibration_samples, heldout_samples

    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 20, encoding="utf-8")
    expected = pack(load_texts(path, tokenizer), tokenizer, 8, 3)
    assert expected.shape == (3, 8)
    assert torch.equal(calibration_samples(tokenizer, path, 8, 3), expected)
    assert torch.equal(heldout_samples(tokenizer, path, 8, 3), expected)


@pytest.mark.parametrize("name", ["corpus.csv", "missing.txt", "missing.jsonl"])
def test_load_texts_errors_name_the_file_and_what_is_accepted(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(SeqgenError) as info:
        load_texts(path)
    message = str(info.value)
    assert str(path) in message and ".txt" in message and ".jsonl" in message


def test_load_jsonl_bad_record_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n", encoding="utf-8")
    with pytest.raises(SeqgenError, match=re.escape(f"{path}:2")):
        load_texts(path)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(SeqgenError, match=re.escape(f"{path}:1")):
        load_texts(path)


class FakeDatasets:
    """Stands in for the `datasets` package (this machine has no network): records what load_dataset is asked."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.calls: list[tuple] = []
        self.read = 0

    def load_dataset(self, name: str, config: str | None, *, split: str, streaming: bool):
        self.calls.append((name, config, split, streaming))
        if name == "missing/dataset":
            raise FileNotFoundError("Dataset 'missing/dataset' doesn't exist on the Hub")
        for row in self.rows:
            self.read += 1
            yield row


def test_hub_dataset_names_are_parsed_and_rows_read_like_jsonl(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    fake = FakeDatasets([{"text": "first document"}, {"text": "  "}, chat, {"text": "x" * 100}, {"text": "never"}])
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    texts = hub_texts("wikitext:wikitext-2-raw-v1@test", max_chars=100)
    assert fake.calls == [("wikitext", "wikitext-2-raw-v1", "test", True)]
    assert texts == ["first document", "user: hi\nassistant: hello", "x" * 100] and fake.read == 4
    assert resolve_texts("HuggingFaceH4/ultrachat_200k", "calibration")[0] == "first document"
    assert fake.calls[-1] == ("HuggingFaceH4/ultrachat_200k", None, "train", True)

    with pytest.raises(SeqgenError, match=r"'missing/dataset'.*Check the name, config and split"):
        hub_texts("missing/dataset")
    fake.rows = [{"body": "no text field"}]
    with pytest.raises(SeqgenError, match=r"row 0 has neither a 'text'.*fields: \['body'\]"):
        hub_texts("some/dataset")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # not installed
    with pytest.raises(SeqgenError, match="pip install datasets"):
        resolve_texts("some/dataset", "calibration")


def test_resolve_texts_prefers_files_and_the_builtin_corpus(tmp_path: Path) -> None:
    assert resolve_texts(None, "heldout") == default_texts("heldout")
    path = tmp_path / "corpus.txt"
    path.write_text("one\n\ntwo", encoding="utf-8")
    assert resolve_texts(str(path), "calibration") == ["one", "two"]
    with pytest.raises(SeqgenError, match="no such file"):
        resolve_texts(str(tmp_path / "missing.jsonl"), "calibration")
    with pytest.raises(SeqgenError, match="is a directory"):
        resolve_texts(str(tmp_path), "calibration")


# ---- batching and padding ------------------------------------------------------------------------------------------


def test_batches_split_samples_with_full_masks() -> None:
    samples = torch.arange(5 * 3, dtype=torch.int64).view(5, 3)
    out = batches(samples, batch_size=2)
    assert [b["input_ids"].shape[0] for b in out] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), samples)
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in out)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch_masks_padding(side: str) -> None:
    out = pad_batch([[5, 6, 7], [8], []], pad_id=0, side=side)
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (3, 3)
    if side == "left":
        assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
        assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    else:
        assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
        assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]


def test_pad_batch_rejects_unknown_side() -> None:
    with pytest.raises(SeqgenError, match="side"):
        pad_batch([[1]], pad_id=0, side="middle")
