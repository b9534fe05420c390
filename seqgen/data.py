"""Calibration and evaluation text: reading corpora, a built-in corpus, packing tokens into fixed-length samples.

* :func:`load_texts` reads ``.txt`` (documents separated by blank lines) or ``.jsonl`` (``text`` or chat ``messages``);
* :func:`hub_texts` streams the same fields from a Hugging Face ``datasets`` name (online only);
* :func:`resolve_texts` picks one of these, or the built-in corpus, for a ``--dataset`` value;
* :func:`default_texts` builds a corpus at run time from the docstrings of the Python standard library, so
  calibration works offline and the repository ships no third-party prose;
* :func:`pack` turns documents into a ``[num_samples, seq_len]`` int64 tensor of token ids;
* :func:`batches` and :func:`pad_batch` make ``{"input_ids", "attention_mask"}`` batches for a model.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import BadInput, MissingInput, SeqgenError

__all__ = [
    "CALIBRATION_MODULES",
    "HELDOUT_MODULES",
    "SPLITS",
    "load_texts",
    "read_jsonl",
    "hub_texts",
    "resolve_texts",
    "default_texts",
    "pack",
    "batches",
    "pad_batch",
]

logger = logging.getLogger(__name__)

ACCEPTED_SUFFIXES = (".txt", ".jsonl")

# Standard-library modules whose docstrings make the built-in corpus. Both lists are fixed and sorted, disjoint,
# present from Python 3.10 on, and free of import side effects. Only objects defined in a module itself count, so a
# function re-exported by another module never lands in both splits.
CALIBRATION_MODULES: tuple[str, ...] = (
    "argparse",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.locks",
    "asyncio.queues",
    "asyncio.streams",
    "asyncio.tasks",
    "collections",
    "concurrent.futures._base",
    "concurrent.futures.process",
    "configparser",
    "contextlib",
    "dataclasses",
    "decimal",
    "difflib",
    "email.message",
    "email.utils",
    "enum",
    "fractions",
    "functools",
    "http.client",
    "http.cookiejar",
    "http.server",
    "inspect",
    "ipaddress",
    "logging",
    "logging.handlers",
    "multiprocessing.pool",
    "pathlib",
    "pickle",
    "random",
    "shutil",
    "smtplib",
    "statistics",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "zipfile",
)

HELDOUT_MODULES: tuple[str, ...] = (
    "ast",
    "base64",
    "bdb",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "copy",
    "datetime",
    "doctest",
    "email.feedparser",
    "email.header",
    "filecmp",
    "fileinput",
    "ftplib",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "imaplib",
    "json.decoder",
    "json.encoder",
    "locale",
    "mailbox",
    "numbers",
    "operator",
    "optparse",
    "os",
    "platform",
    "poplib",
    "pprint",
    "queue",
    "sched",
    "selectors",
    "shlex",
    "socket",
    "socketserver",
    "string",
    "tempfile",
    "timeit",
    "tokenize",
    "traceback",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
)

SPLITS: dict[str, tuple[str, ...]] = {"calibration": CALIBRATION_MODULES, "heldout": HELDOUT_MODULES}

# a paragraph counts as prose when it has this many words, mostly made of letters, and no code markers
_MIN_PARAGRAPH_WORDS = 8
_MIN_LETTER_FRACTION = 0.75
_MIN_DOC_WORDS = 30
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[-=~^*]{3,}\s*$|[A-Za-z_][\w.]*\(.*\)\s*(->.*)?$)")


# ---- reading corpora ------------------------------------------------------------------------------------------------


def load_texts(path: str | Path, tokenizer: Any = None) -> list[str]:
    """The documents of a corpus file.

    ``.txt``: documents are separated by one or more blank lines. ``.jsonl``: one JSON object a line, with either a
    ``"text"`` string or a ``"messages"`` list of ``{"role", "content"}``; a chat is rendered with the tokenizer's chat
    template when ``tokenizer`` has one, else as ``role: content`` lines. Empty documents are dropped.
    """
    path = Path(path)
    accepted = "a .txt file (documents separated by blank lines) or a .jsonl file (a 'text' or 'messages' field)"
    suffix = path.suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise SeqgenError(f"cannot read texts from {path}: unknown suffix {path.suffix!r}. Pass {accepted}.")
    if not path.is_file():
        raise MissingInput(f"cannot read texts from {path}: no such file. Pass an existing path to {accepted}.")
    if suffix == ".txt":
        texts = [block.strip() for block in re.split(r"\n\s*\n", _read_text(path, accepted))]
    else:
        texts, chats = [], 0
        for where, record in read_jsonl(path, accepted):
            texts.append(_record_text(record, where, "give each line one of the two", tokenizer))
            chats += _is_chat(record)
        _warn_if_untemplated(chats, tokenizer)
    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise SeqgenError(f"{path} holds no text. Pass {accepted} with at least one non-empty document.")
    return texts


def _read_text(path: Path, accepted: str) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped); binary or otherwise encoded files are refused with the
    line and column of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise BadInput(
            f"{path}:{line}:{column} is not UTF-8 text (byte 0x{data[exc.start]:02x}); a binary file, or text in "
            f"another encoding. Pass {accepted}, in UTF-8 (e.g. `iconv -t UTF-8`)."
        ) from None
    if "\x00" in content:
        line = content.count("\n", 0, content.index("\x00")) + 1
        raise BadInput(f"{path}:{line} holds a NUL character: a binary file, not text. Pass {accepted}.")
    return content


def read_jsonl(path: Path, accepted: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of a ``.jsonl`` file, each with where it is (``path:line``); blank lines are skipped, and a line
    that is not a JSON object is refused with its place (``accepted`` says what the file should be)."""
    for number, line in enumerate(_read_text(path, accepted).splitlines(), 1):
        record = _jsonl_record(path, number, line)
        if record is not None:
            yield f"{path}:{number}", record


def _jsonl_record(path: Path, number: int, line: str) -> dict[str, Any] | None:
    if not line.strip():
        return None
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{where} is not valid JSON ({exc.msg}); each line of a .jsonl file is one object.") from exc
    if not isinstance(record, dict):
        raise SeqgenError(f"{where} is a JSON {type(record).__name__}; each line must be an object with 'text'.")
    return record


def _is_chat(record: dict[str, Any]) -> bool:
    """Whether a record that :func:`_record_text` accepted is read from its ``messages``."""
    return not isinstance(record.get("text"), str)


def _record_text(record: dict[str, Any], where: str, fix: str, tokenizer: Any) -> str:
    """The ``text`` of a record, or its chat ``messages`` rendered (see :func:`load_texts`)."""
    if isinstance(record.get("text"), str):
        return record["text"]
    messages = record.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) and "content" in m for m in messages):
        return _render_chat(messages, tokenizer)
    raise SeqgenError(
        f"{where} has neither a 'text' string nor a 'messages' list of {{'role', 'content'}} objects "
        f"(fields: {sorted(record)}); {fix}."
    )


def hub_texts(spec: str, tokenizer: Any = None, max_chars: int | None = None) -> list[str]:
    """Documents of the Hugging Face dataset ``spec`` = ``NAME[:CONFIG][@SPLIT]`` (split ``train`` by default), e.g.
    ``wikitext:wikitext-2-raw-v1@test`` or ``HuggingFaceH4/ultrachat_200k@train_sft``.

    Rows are streamed (nothing but what is read is downloaded) and read like ``.jsonl`` lines: a ``text`` string or
    chat ``messages``. Reading stops once the documents hold ``max_chars`` characters. Needs the ``datasets``
    package and network access to the Hub.
    """
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError as exc:
        raise SeqgenError(
            f"--dataset {spec!r} is neither a file nor usable as a Hugging Face dataset: the `datasets` package is "
            "not installed. pip install datasets, or pass a .txt/.jsonl file."
        ) from exc
    try:
        rows = datasets.load_dataset(name, config or None, split=split, streaming=True)
        texts: list[str] = []
        chars = chats = 0
        for number, row in enumerate(rows):
            record = dict(row)
            text = _record_text(
                record,
                f"dataset {spec!r} row {number}",
                "pass NAME[:CONFIG][@SPLIT] of a text or chat dataset, or a .txt/.jsonl file",
                tokenizer,
            )
            chats += _is_chat(record)
            if text.strip():
                texts.append(text)
                chars += len(text)
            if max_chars is not None and chars >= max_chars:
                break
    except SeqgenError:
        raise
    except Exception as exc:  # datasets raises many kinds: not found, no network, bad config or split
        raise SeqgenError(
            f"could not read the Hugging Face dataset {name!r} (config {config or None!r}, split {split!r}): "
            f"{type(exc).__name__}: {exc}. Check the name, config and split (NAME[:CONFIG][@SPLIT]) and the network, "
            "or pass a local .txt/.jsonl file."
        ) from exc
    if not texts:
        raise SeqgenError(f"the Hugging Face dataset {spec!r} has no text rows; pass another split or a local file.")
    _warn_if_untemplated(chats, tokenizer)
    logger.info("read %d documents (%d characters) from the Hugging Face dataset %s", len(texts), chars, spec)
    return texts


def resolve_texts(
    source: str | Path | None, split: str, tokenizer: Any = None, max_chars: int | None = None
) -> list[str]:
    """The documents for a ``--dataset`` value: the built-in corpus's ``split`` when None, a ``.txt``/``.jsonl`` file
    when ``source`` names one (or ends in such a suffix), else a Hugging Face dataset name (:func:`hub_texts`)."""
    if source is None:
        return default_texts(split)
    path = Path(source)
    if path.is_file() or path.suffix.lower() in ACCEPTED_SUFFIXES:
        return load_texts(path, tokenizer)
    if path.exists():
        raise SeqgenError(f"--dataset {source}: it is a directory; pass a .txt or .jsonl file, or a dataset name.")
    return hub_texts(str(source), tokenizer, max_chars)


def _render_chat(messages: list[dict[str, Any]], tokenizer: Any) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in messages)


def _warn_if_untemplated(chats: int, tokenizer: Any) -> None:
    if chats and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        logger.warning(
            "the tokenizer has no chat template: %d chat records are calibrated as 'role: content' lines", chats
        )


# ---- the built-in corpus --------------------------------------------------------------------------------------------


def default_texts(split: str = "calibration") -> list[str]:
    """A corpus built from standard-library docstrings, with no download: ``"calibration"`` or ``"heldout"``.

    The two splits read disjoint module lists (:data:`CALIBRATION_MODULES`, :data:`HELDOUT_MODULES`). Each document is
    the prose of one module's, class's or function's docstring: doctest lines, signatures, tables and short fragments
    are dropped. The result is the same for the same Python version.
    """
    if split not in SPLITS:
        raise SeqgenError(f"unknown default corpus split {split!r}; use one of {sorted(SPLITS)}.")
    texts: list[str] = []
    seen: set[str] = set()
    for module_name in SPLITS[split]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a trimmed Python build; the corpus is a little smaller
            logger.warning("default corpus: standard-library module %s is missing, skipped", module_name)
            continue
        for doc in _module_docs(module):
            text = _prose(doc)
            if text is not None and text not in seen:
                seen.add(text)
                texts.append(text)
    return texts


def _module_docs(module: Any) -> Iterator[str]:
    """The module's own docstring, then those of the classes and functions it defines, in name order."""
    if isinstance(module.__doc__, str):
        yield module.__doc__
    for _, obj in sorted(vars(module).items()):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != module.__name__:
            continue
        yield from _own_doc(obj)
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    yield from _own_doc(member)


def _own_doc(obj: Any) -> Iterator[str]:
    # obj.__doc__, not inspect.getdoc: getdoc falls back to a base class's docstring, which repeats text
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if isinstance(doc, str):
        yield doc


def _prose(doc: str) -> str | None:
    """The prose paragraphs of a docstring joined by blank lines, or None when too little prose is left."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        if not lines or any(_CODE_LINE.match(line) for line in lines):
            continue
        if any(line.startswith(("    ", "\t")) for line in lines):  # indented: code, a table or a parameter list
            continue
        words = paragraph.split()
        letters = sum(ch.isalpha() for ch in paragraph)
        visible = sum(not ch.isspace() for ch in paragraph)
        if len(words) < _MIN_PARAGRAPH_WORDS or letters < _MIN_LETTER_FRACTION * visible:
            continue
        if paragraph.rstrip().endswith(":"):  # introduces an example or a list that was dropped
            continue
        kept.append(" ".join(line.strip() for line in lines))
    text = "\n\n".join(kept)
    return text if len(text.split()) >= _MIN_DOC_WORDS else None


# ---- tokens ---------------------------------------------------------------------------------------------------------


def pack(texts: Sequence[str], tokenizer: Any, seq_len: int, num_samples: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens, as an int64 tensor ``[num_samples, seq_len]``.

    The texts are tokenized without special tokens and concatenated in order with the tokenizer's EOS token between
    documents; the stream is cut into consecutive, non-overlapping windows. When there are more windows than needed,
    ``seed`` picks which (they stay in stream order); the same arguments give the same tensor.
    """
    if seq_len < 1 or num_samples < 1:
        raise SeqgenError(f"pack needs seq_len >= 1 and num_samples >= 1, got {seq_len} and {num_samples}.")
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    if texts:
        for index, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
            if index and eos is not None:
                stream.append(eos)
            stream.extend(ids)
    needed = seq_len * num_samples
    if len(stream) < needed:
        raise SeqgenError(
            f"the calibration texts have {len(stream)} tokens in {len(texts)} documents, but {num_samples} samples of "
            f"{seq_len} tokens need {needed}; give more text, or fewer or shorter samples."
        )
    windows = len(stream) // seq_len
    tokens = torch.tensor(stream[: windows * seq_len], dtype=torch.int64).view(windows, seq_len)
    if windows == num_samples:
        return tokens
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=generator)[:num_samples].sort().values
    return tokens[chosen].contiguous()


def batches(samples: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive ``{"input_ids", "attention_mask"}`` batches of ``batch_size`` rows (the last may be shorter)."""
    if samples.ndim != 2:
        raise SeqgenError(f"batches needs samples of shape [num_samples, seq_len], got {tuple(samples.shape)}.")
    if batch_size < 1:
        raise SeqgenError(f"batch_size must be at least 1, got {batch_size}.")
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in samples.split(batch_size, dim=0)
    ]


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> dict[str, torch.Tensor]:
    """Pad token lists of different lengths into one batch; ``attention_mask`` is 0 on padding.

    ``side="left"`` suits generation (the last position is real in every row), ``"right"`` suits scoring.
    """
    if side not in ("left", "right"):
        raise SeqgenError(f"pad_batch side must be 'left' or 'right', got {side!r}.")
    if not token_lists:
        raise SeqgenError("pad_batch needs at least one token list.")
    width = max(len(tokens) for tokens in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.int64)
    for row, tokens in enumerate(token_lists):
        if not tokens:
            continue
        columns = slice(width - len(tokens), width) if side == "left" else slice(0, len(tokens))
        input_ids[row, columns] = torch.as_tensor(list(tokens), dtype=torch.int64)
        attention_mask[row, columns] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
