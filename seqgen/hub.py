"""Hugging Face Hub model ids (``org/name``), resolved to a snapshot directory in huggingface_hub's cache.

Everything goes through huggingface_hub, so its environment applies: ``HF_HOME`` and ``HF_HUB_CACHE`` (where
snapshots live), ``HF_TOKEN`` (gated and private models) and ``HF_HUB_OFFLINE=1`` (the cache only, no network).
Each command fetches only what it needs: emitting reads the config (and a model's own modeling code, for
``--trust-remote-code``); calibrating also reads the tokenizer, processor and serving files and the safetensors
weights, and ``.bin`` weights only for a model that has no safetensors. Downloads show huggingface_hub's progress
bars. The snapshot directory is named by the commit it holds, which :func:`snapshot` logs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

from .errors import SeqgenError

__all__ = ["CONFIG_FILES", "CALIBRATION_FILES", "is_hub_id", "snapshot", "snapshot_origin"]

logger = logging.getLogger(__name__)

#: What emitting a hub model reads: its config, and its own modeling code where it has some (``auto_map``).
CONFIG_FILES = ("config.json", "*.py")
#: What calibrating reads beyond the config and the weights: tokenizer, chat template, processor, generation config.
CALIBRATION_FILES = (
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
_SAFETENSORS = ("*.safetensors", "*.safetensors.index.json")
_BIN = ("*.bin", "*.bin.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})")


def is_hub_id(model_id: str) -> bool:
    """Whether ``model_id`` names a hub repository: ``org/name`` (or a legacy ``name``) that is no local path."""
    return _HUB_ID.fullmatch(model_id) is not None and not Path(model_id).exists()


def snapshot(
    model_id: str, *, revision: str | None = None, files: Literal["config", "tokenizer", "weights"] = "config"
) -> Path:
    """The local snapshot directory of hub model ``model_id`` at ``revision`` (default: the main branch) holding
    ``files``: its config and modeling code; ``tokenizer``: also the tokenizer, processor and generation files;
    ``weights``: also the weights."""
    patterns = list(CONFIG_FILES)
    if files in ("tokenizer", "weights"):
        patterns += CALIBRATION_FILES
    if files == "weights":
        patterns += _SAFETENSORS
    path = _download(model_id, revision, patterns)
    if not (path / "config.json").is_file():
        raise SeqgenError(f"{_named(model_id, revision)} has no config.json ({path}); is it a transformers model?")
    if files == "weights" and not any(path.glob("*.safetensors")):
        path = _download(model_id, revision, list(_BIN))
        if not any(path.glob("*.bin")):
            raise SeqgenError(
                f"the cached snapshot of {_named(model_id, revision)} ({path}) has no weights (*.safetensors or "
                f"*.bin). Download them where the hub can be reached (`hf download {model_id}`), or unset "
                "HF_HUB_OFFLINE."
            )
    logger.info("%s: commit %s (%s)", _named(model_id, revision), path.name, path)
    return path


def snapshot_origin(path: str | Path) -> dict[str, str] | None:
    """``{"id": "org/name", "commit": ...}`` when ``path`` is a snapshot directory of huggingface_hub's cache (its
    name is the commit it holds); None for any other path."""
    match = _SNAPSHOT.search(Path(path).as_posix())
    if match is None or Path(path).name != match["commit"]:
        return None
    return {"id": match["repo"].replace("--", "/"), "commit": match["commit"]}


def _named(model_id: str, revision: str | None) -> str:
    return model_id if revision is None else f"{model_id}@{revision}"


def _download(model_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = _named(model_id, revision)
    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise SeqgenError(
            f"{name!r} is not a local directory, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) while "
            "the hub cannot be reached (offline, or HF_HUB_OFFLINE is set). Download it where there is network "
            f"(`hf download {model_id}`), point HF_HUB_CACHE at a cache that holds it, or pass a checkpoint directory."
        ) from None
    except GatedRepoError:  # before RepositoryNotFoundError, of which it is a kind
        raise SeqgenError(f"{name} is gated: accept its terms on the hub, then set HF_TOKEN.") from None
    except RevisionNotFoundError:
        raise SeqgenError(f"{model_id} has no revision {revision!r}; check --revision.") from None
    except RepositoryNotFoundError:
        raise SeqgenError(
            f"{name!r} is not a local directory, and no model of that name is on the hub (a private one needs "
            "HF_TOKEN)."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise SeqgenError(f"cannot download {name}: {exc}") from exc
