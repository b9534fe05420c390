"""Architecture coverage: a fixed subset of the causal-LM types, emitted from their configs on the meta device and
checked in a fresh process; the error an untraceable model gets; targets of a model without ``_no_split_modules``.

The whole sweep over every model type is ``bench/arch_sweep.py`` (results in docs/coverage.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import run_fresh, save_tiny

from seqgen import TraceFailure
from seqgen.emitter import EmitOptions, emit_model
from seqgen.models import meta_model, tiny_config

# The priority list (less mllama, whose cross-attention layers skip a text batch; the sweep covers it), then one
# architecture for each mechanism that a family needed: no _no_split_modules (openai-gpt, ctrl, git), an embedding
# listed in _no_split_modules (bert), a decoder that get_decoder() does not return (modernbert-decoder), a KV cache
# built regardless of use_cache (xlm), keys and values shared between layers (gemma4_text), module outputs with None
# entries (xlnet), a position table stored on the model (ctrl), weights rescaled in place (rwkv), a multimodal
# wrapper whose text masks come as a dict (gemma3), numerics that differ with a KV cache (gpt_neo); then more
# hybrid (mamba, linear attention), recurrent, MoE and encoder-decoder layouts; vision-language models that only
# AutoModelForImageTextToText builds, run on text (qwen2_5_vl: M-RoPE; idefics3: `.to(self.device)`, a meta device
# at trace time; qwen3_vl_moe: fused experts stored transposed in its checkpoints).
COVERAGE_ARCHS = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "qwen3_next",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "phimoe",
    "gpt2",
    "gpt_neox",
    "gptj",
    "opt",
    "falcon",
    "bloom",
    "olmo2",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "cohere2",
    "starcoder2",
    "jamba",
    "lfm2",
    "nemotron_h",
    "zamba2",
    "openai-gpt",
    "ctrl",
    "git",
    "bert",
    "modernbert-decoder",
    "xlm",
    "gemma4_text",
    "xlnet",
    "rwkv",
    "gemma3",
    "gpt_neo",
    "mamba",
    "mamba2",
    "falcon_mamba",
    "falcon_h1",
    "bamba",
    "granitemoehybrid",
    "recurrent_gemma",
    "xlstm",
    "minimax",
    "kimi_linear",
    "llama4_text",
    "glm4_moe",
    "ernie4_5_moe",
    "gemma3n_text",
    "bart",
    "whisper",
    "qwen2_5_vl",
    "mistral3",
    "idefics3",
    "qwen3_vl_moe",
]


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict, int]]:
    root = tmp_path_factory.mktemp("coverage")
    found = {}
    for arch in COVERAGE_ARCHS:
        model_dir, model = save_tiny(arch, root)
        result = emit_model(meta_model(model.config), root / arch / "package")
        found[arch] = (model_dir, result.path, result.index, model.config.get_text_config().num_hidden_layers)
    return found


def test_fresh_process_reproduces_eager(emitted: dict[str, tuple[Path, Path, dict, int]]) -> None:
    args = [str(p) for model_dir, package_dir, _, _ in emitted.values() for p in (model_dir, package_dir)]
    report = run_fresh("run_packages.py", *args)
    assert report["tracer_modules"] == [], "loading a package must not import the tracer or the emitter"
    for arch, (_, package_dir, _, _) in emitted.items():
        for shape, diff in report["diffs"][str(package_dir)].items():
            assert diff == 0.0, f"{arch}: logits differ from eager by {diff} for batch {shape}"


# models whose blocks are the i-th items of parallel module lists: the parts of a block share its subgraph
BLOCK_PARTS = {"xlm": ["attentions", "layer_norm1", "ffns", "layer_norm2"]}


@pytest.mark.parametrize("arch", COVERAGE_ARCHS)
def test_one_subgraph_per_decoder_layer(emitted: dict[str, tuple[Path, Path, dict, int]], arch: str) -> None:
    _, _, index, layers = emitted[arch]
    with_targets = [sg["targets"] for sg in index["subgraphs"] if sg["targets"]]
    assert len(with_targets) == layers
    for i, targets in enumerate(with_targets):
        parts = BLOCK_PARTS.get(arch)
        if parts is None:
            assert len(targets) == 1
        else:
            assert [t.split(".")[-2:] for t in targets] == [[part, str(i)] for part in parts]
    assert index["subgraphs"][0]["targets"] == [] and index["subgraphs"][-1]["outputs"] == ["logits"]


# ---- an untraceable model names the module, the line, the construct and the option ------------------------------


def has_padding_token(input_ids: torch.Tensor) -> torch.Tensor:
    if (input_ids == 0).any():  # branches on tensor contents
        return input_ids + 1
    return input_ids


def _branchy_llama(branch_in_helper: bool) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    class BranchyLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if branch_in_helper:
                input_ids = has_padding_token(input_ids)
            elif (input_ids == 0).any():
                input_ids = input_ids + 1
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    with torch.device("meta"):
        return BranchyLlama(tiny_config("llama")).eval()


def test_untraceable_branch_names_module_line_construct_and_option(tmp_path: Path) -> None:
    with pytest.raises(TraceFailure) as caught:
        emit_model(_branchy_llama(branch_in_helper=False), tmp_path / "a")
    message = str(caught.value)
    assert "BranchyLlama" in message and "in _branchy_llama.<locals>.BranchyLlama.forward" in message
    assert re.search(r"test_coverage\.py:\d+", message)
    assert "`elif (input_ids == 0).any():`" in message and "branches on tensor contents" in message
    assert "--targets" in message
    assert not (tmp_path / "a").exists(), "nothing is written for a model that cannot be traced"


def test_untraceable_helper_suggests_ignore_and_that_helps(tmp_path: Path) -> None:
    with pytest.raises(TraceFailure) as caught:
        emit_model(_branchy_llama(branch_in_helper=True), tmp_path / "a")
    message = str(caught.value)
    assert "in has_padding_token" in message and "`if (input_ids == 0).any():" in message
    assert "`--ignore has_padding_token`" in message
    options = EmitOptions(ignore=("has_padding_token",))
    index = emit_model(_branchy_llama(branch_in_helper=True), tmp_path / "b", options).index
    assert [sg["targets"] for sg in index["subgraphs"]] == [[], ["model.layers.0"], ["model.layers.1"], []]
    head = (tmp_path / "b" / index["subgraphs"][0]["file"]).read_text()
    assert "has_padding_token(input_ids)" in head


# ---- targets of a model without _no_split_modules ------------------------------------------------------------------


def test_model_without_no_split_modules_gets_one_subgraph_per_repeated_block(tmp_path: Path) -> None:
    model = meta_model(tiny_config("openai-gpt", n_layer=3))
    assert not getattr(model, "_no_split_modules", None)
    index = emit_model(model, tmp_path / "p").index
    assert [sg["targets"] for sg in index["subgraphs"]] == [
        [],
        ["transformer.h.0"],
        ["transformer.h.1"],
        ["transformer.h.2"],
        [],
    ]


def test_vision_tower_blocks_are_not_targets(tmp_path: Path) -> None:
    """git has no _no_split_modules and two lists of repeated blocks: its image encoder's and its text decoder's."""
    model = meta_model(tiny_config("git"))
    index = emit_model(model, tmp_path / "p").index
    targets = [sg["targets"] for sg in index["subgraphs"] if sg["targets"]]
    assert targets == [["git.encoder.layer.0"], ["git.encoder.layer.1"]]


# ---- vision-language models with image inputs ----------------------------------------------------------------------

IMAGE_TOKEN = 98  # inside the tiny vocabulary (99), unlike the full-size placeholder ids


def _vision_language(arch: str) -> tuple[object, dict[str, torch.Tensor], tuple[str, ...]]:
    """A tiny config whose images become 4 placeholder tokens, a batch with 2 images, and the --ignore it needs."""
    ignore: tuple[str, ...] = ()
    if arch == "qwen2_vl":
        config = tiny_config(
            arch, image_token_id=IMAGE_TOKEN, video_token_id=97, vision_start_token_id=96, vision_end_token_id=95
        )
        config.text_config.rope_parameters["mrope_section"] = [1, 2, 1]  # the rotary half of a head of 8
        # M-RoPE position ids scan the tokens for image spans: the generated code calls the method itself
        ignore = ("Qwen2VLModel.get_rope_index",)
    else:
        config = tiny_config(arch, image_token_index=IMAGE_TOKEN)
        config.vision_config.image_size = 28 if arch == "llava" else 64  # 2x2 patches of 14; 4x4 of 16, pooled to 4
        if arch == "gemma3":
            config.mm_tokens_per_image = 4
    config = type(config).from_dict(config.to_dict())
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 90, (2, 16), generator=generator)
    input_ids[:, 3:7] = IMAGE_TOKEN
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 0] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch == "qwen2_vl":
        input_ids[:, 2], input_ids[:, 7] = 96, 95
        vision = config.vision_config
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        batch["pixel_values"] = torch.randn(2 * 16, patch, generator=generator)  # 2 images of 4x4 patches
        batch["image_grid_thw"] = torch.tensor([[1, 4, 4], [1, 4, 4]])
        batch["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    else:
        size = config.vision_config.image_size
        batch["pixel_values"] = torch.randn(2, 3, size, size, generator=generator)
    return config, batch, ignore


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3"])
def test_vision_language_model_with_images(tmp_path: Path, arch: str) -> None:
    """Decoder layers of the language model are the targets; the vision tower and projector run in the head."""
    from transformers import AutoModelForImageTextToText

    import seqgen
    from seqgen.index import InputSpec

    config, batch, ignore = _vision_language(arch)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    extra = tuple(
        InputSpec(name, str(value.dtype).removeprefix("torch."), tuple(value.shape))
        for name, value in batch.items()
        if name not in ("input_ids", "attention_mask")
    )
    options = EmitOptions(sample_shape=tuple(batch["input_ids"].shape), extra_inputs=extra, ignore=ignore)
    index = emit_model(meta, tmp_path / "p", options).index
    layers = config.get_text_config().num_hidden_layers
    assert [sg["targets"] for sg in index["subgraphs"]][1:-1] == [
        [f"model.language_model.layers.{i}"] for i in range(layers)
    ]
    head = (tmp_path / "p" / index["subgraphs"][0]["file"]).read_text()
    assert ("model.model.visual(" if arch == "qwen2_vl" else "model.model.vision_tower(") in head
    assert arch == "qwen2_vl" or "model.model.multi_modal_projector(" in head  # qwen2-vl merges inside its tower
    with torch.no_grad():
        expected = model(**batch).logits
        actual = seqgen.load(tmp_path / "p").run(model, **batch)["logits"]
    assert (expected - actual).abs().max().item() == 0.0


# ---- calibration across layouts (the whole sweep: bench/arch_sweep.py --calibrate) ---------------------------------

# one architecture per mechanism: dense; fused experts with a router Parameter, a shared expert and its one-output
# gate, a Linear router, DeepSeek's shared experts, Llama 4's transposed experts, Nemotron-H's ungated ones; linears
# that never run (cross-attention, Mamba's dt_proj); convolutions that the checkpoint stores split (Kimi Linear); a
# vision-language model (its vision tower is not quantized) and its MoE sibling
CALIBRATION_ARCHS = [
    "llama",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "phimoe",
    "deepseek_v3",
    "llama4_text",
    "nemotron_h",
    "jamba",
    "bart",
    "kimi_linear",
    "qwen2_5_vl",
    "qwen3_vl_moe",
]
# transformers 5.24's compressed loader drops the dense tensors of these (seqgen warns at save): disk offload only
LOADER_DROPS = {"kimi_linear"}


@pytest.mark.parametrize("arch", CALIBRATION_ARCHS)
def test_calibrated_checkpoint_reloads_and_disk_offload_writes_the_same(
    emitted: dict[str, tuple[Path, Path, dict, int]], arch: str, tmp_path: Path
) -> None:
    import dataclasses

    from transformers import AutoConfig

    import seqgen
    from seqgen.algorithms import QuantScheme
    from seqgen.checkpoint import SafetensorsWeights, StreamingSaver, save_quantized
    from seqgen.job import _disk_model
    from seqgen.models import auto_class
    from seqgen.runtime import CalibrationOptions, calibrate
    from seqgen.verify import checkpoint_differences, random_batch

    model_dir, package_dir, _, _ = emitted[arch]
    package = seqgen.load(package_dir)
    auto = auto_class(AutoConfig.from_pretrained(model_dir))
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.get_text_config().vocab_size
    batches = [random_batch(vocab, 2, 16, seed=100 + i) for i in range(2)]
    options = CalibrationOptions(scheme=QuantScheme(bits=4, group_size=None, act_order=True), all_experts=True)
    result = calibrate(model, package, batches, options)
    assert result.quantized
    memory = save_quantized(model, result.quantized, tmp_path / "memory", experts=result.experts)
    if arch not in LOADER_DROPS:
        probe = random_batch(vocab, 2, 11, seed=7)
        reloaded = auto.from_pretrained(memory).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**probe).logits, model(**probe).logits, rtol=0, atol=1e-5)

    skeleton = _disk_model(model_dir, torch.float32)
    weights = SafetensorsWeights(model_dir, skeleton)
    with StreamingSaver(skeleton, weights, tmp_path / "disk") as saver:
        calibrate(
            skeleton,
            package,
            batches,
            dataclasses.replace(options, reuse_allocations=False),
            weights=weights,
            on_subgraph_done=saver.add,
            keep_results=False,
        )
    disk = saver.out

    assert checkpoint_differences(memory, disk) == []
