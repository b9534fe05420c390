"""`seqgen calibrate` end to end on a tiny Llama with a real tokenizer: cache, save, reload, disk offload."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import seqgen.emitter
from seqgen.algorithms import QuantScheme
from seqgen.cli import cli
from seqgen.evaluate import perplexity
from seqgen.job import CalibrationJob, heldout_samples, run_job
from seqgen.models import tiny_model
from seqgen.runtime import CalibrationOptions

ARGS = [
    "--algorithm",
    "gptq",
    "--bits",
    "4",
    "--group-size",
    "32",
    "--num-samples",
    "4",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> Path:
    """A tiny Llama with SmolLM2's vocabulary and tokenizer, saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    tiny_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128, head_dim=16).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(path)
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 43).reshape(2, 20)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def tensor_names(checkpoint: Path) -> set[str]:
    names: set[str] = set()
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names.update(f.keys())
    return names


def test_calibrate_twice_hits_the_cache_without_tracing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SEQGEN_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="seqgen.cache")
    runner = CliRunner()
    first = runner.invoke(cli, ["calibrate", "--model", str(checkpoint), *ARGS, "--save", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "partition cache miss: emitting" in caplog.text and "(emitted)" in first.output

    def no_tracing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tracer ran on the second calibrate")

    monkeypatch.setattr(seqgen.emitter, "trace_model", no_tracing)
    second = runner.invoke(cli, ["calibrate", "--model", str(checkpoint), *ARGS, "--save", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    assert "partition cache hit:" in caplog.text and "(cache hit)" in second.output


def test_a_trace_failure_stops_the_job_before_the_weights_load(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The package is emitted (or a given one checked) on a weightless skeleton first: a 70B model's weights take
    minutes to load, and a model that cannot be traced, or a package of another model, must be refused before."""
    import seqgen.models
    from seqgen.errors import SeqgenError

    monkeypatch.setenv("SEQGEN_CACHE", str(tmp_path / "cache"))

    def untraceable(*args: object, **kwargs: object) -> None:
        raise SeqgenError("cannot trace LlamaDecoderLayer: a stand-in failure")

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded before the package was emitted")

    monkeypatch.setattr(seqgen.emitter, "trace_model", untraceable)
    monkeypatch.setattr(seqgen.models, "load_model", loaded)
    result = CliRunner().invoke(cli, ["calibrate", "--model", str(checkpoint), *ARGS, "--save", str(tmp_path / "q")])
    assert result.exit_code != 0 and "a stand-in failure" in result.output, result.output
    assert not (tmp_path / "q").exists()
    monkeypatch.undo()
    monkeypatch.setenv("SEQGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(seqgen.models, "load_model", loaded)
    emitted = CliRunner().invoke(cli, ["emit", "tiny:llama", str(tmp_path / "other")])  # a package of another model
    assert emitted.exit_code == 0, emitted.output
    result = CliRunner().invoke(
        cli, ["calibrate", str(tmp_path / "other"), "--model", str(checkpoint), *ARGS, "--save", str(tmp_path / "q")]
    )
    assert result.exit_code != 0 and "emitted for another model" in result.output, result.output


def test_saved_model_reloads_with_the_same_logits(checkpoint: Path, tmp_path: Path) -> None:
    options = CalibrationOptions(scheme=QuantScheme(bits=4, group_size=32))
    job = CalibrationJob(
        model_id=str(checkpoint),
        save_dir=tmp_path / "compressed",
        num_samples=4,
        seq_len=32,
        batch_size=2,
        options=options,
    )
    summary = run_job(job)
    assert summary.linears == 2 * 7
    expected = logits(summary.model)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed", dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded), expected)
    config = reloaded.config.quantization_config
    assert "lm_head" in str(config)
    out = reloaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)

    # disk offload: the same quantized model, streamed out subgraph by subgraph
    disk = run_job(
        CalibrationJob(
            model_id=str(checkpoint),
            save_dir=tmp_path / "disk",
            num_samples=4,
            seq_len=32,
            batch_size=2,
            offload="disk",
            options=options,
        )
    )
    assert disk.linears == summary.linears and disk.result.quantized == {}
    from_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "disk", dtype=torch.float32).eval()
    assert torch.equal(logits(from_disk), expected)
    assert tensor_names(tmp_path / "disk") == tensor_names(tmp_path / "compressed"), "no unquantized copies"

    fake = run_job(
        CalibrationJob(
            model_id=str(checkpoint),
            save_dir=tmp_path / "fake",
            num_samples=4,
            seq_len=32,
            batch_size=2,
            save_format="fake",
            options=options,
        )
    )
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32).eval()
    assert getattr(plain.config, "quantization_config", None) is None
    assert torch.equal(logits(plain), logits(fake.model))


def test_spill_dir_and_dtype_flags(checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "calibrate",
            "--model",
            str(checkpoint),
            *ARGS,
            "--spill-dir",
            str(tmp_path / "spill"),
            "--dtype",
            "bfloat16",
            "--save",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "spill").is_dir() and not any((tmp_path / "spill").iterdir())
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as saved:
        assert saved.get_tensor("model.layers.1.self_attn.o_proj.weight_scale").dtype == torch.bfloat16


def test_eval_prints_perplexity(checkpoint: Path) -> None:
    def evaluate(*extra: str) -> float:
        result = CliRunner().invoke(
            cli, ["eval", "--model", str(checkpoint), "--seq-len", "32", "--max-samples", "2", *extra]
        )
        assert result.exit_code == 0, result.output
        assert "(2 samples x 32 tokens)" in result.stdout
        return float(result.stdout.split("perplexity: ")[1].split()[0])

    samples = heldout_samples(AutoTokenizer.from_pretrained(checkpoint), None, 32, 2)
    expected = {
        dtype: perplexity(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval(), samples)
        for dtype in (torch.float32, torch.bfloat16)
    }
    assert expected[torch.float32] > 1.0 and round(expected[torch.float32], 4) != round(expected[torch.bfloat16], 4)
    assert evaluate() == round(expected[torch.float32], 4)  # the CPU's default: fp32, whatever the checkpoint's
    assert evaluate("--dtype", "bfloat16") == round(expected[torch.bfloat16], 4)


def test_gptq_act_order_saves_compressed(checkpoint: Path, tmp_path: Path) -> None:
    options = CalibrationOptions(scheme=QuantScheme(bits=4, group_size=32, act_order=True, symmetric=True))
    summary = run_job(
        CalibrationJob(
            model_id=str(checkpoint),
            save_dir=tmp_path / "act",
            num_samples=4,
            seq_len=32,
            batch_size=2,
            options=options,
        )
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "act", dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded), logits(summary.model))
    assert '"actorder": "weight"' in (tmp_path / "act" / "config.json").read_text()


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> Path:
    """A tiny Mixtral (4 experts, 2 per token) with SmolLM2's vocabulary and tokenizer."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-mixtral"
    tiny_model("mixtral", vocab_size=49152, hidden_size=64, intermediate_size=64).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(path)
    return path


def test_all_experts_flag_feeds_every_expert(moe_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    result = CliRunner().invoke(
        cli,
        [
            "calibrate",
            "--model",
            str(moe_checkpoint),
            *ARGS,
            "--all-experts",
            "--experts-per-pass",
            "3",
            "--save",
            str(tmp_path / "all"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "quantized 8 linears and 16 expert projections" in result.output  # 2 layers x 2 projections x 4 experts
    assert re.search(r"time by phase: onload [\d.]+s, calibrate [\d.]+s, compress [\d.]+s", result.output)

    # the same calibration (the CLI's defaults) without all_experts: experts see only the tokens routed to them
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True, act_order=True, dampening=0.01)
    routed = run_job(
        CalibrationJob(
            model_id=str(moe_checkpoint),
            save_dir=tmp_path / "routed",
            num_samples=4,
            seq_len=32,
            batch_size=2,
            options=CalibrationOptions(scheme=scheme),
        )
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "routed", dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded), logits(routed.model))  # fused experts round trip, per-expert packed

    def packed(directory: Path, name: str) -> torch.Tensor:
        with safe_open(directory / "model.safetensors", "pt") as checkpoint:
            return checkpoint.get_tensor(f"model.layers.0.{name}.weight_packed")

    # layer 0's attention saw the same inputs either way; its experts' Hessians did not
    assert torch.equal(packed(tmp_path / "all", "self_attn.q_proj"), packed(tmp_path / "routed", "self_attn.q_proj"))
    assert any(
        not torch.equal(
            packed(tmp_path / "all", f"block_sparse_moe.experts.{e}.w1"),
            packed(tmp_path / "routed", f"block_sparse_moe.experts.{e}.w1"),
        )
        for e in range(4)
    )


# the checkpoint's name of expert 3's down projection: transformers 5 fuses the experts when it loads the checkpoint;
# GraniteMoE's checkpoint keeps them fused, under other names (block_sparse_moe.input_linear/output_linear)
DOWN_3 = {
    "mixtral": "block_sparse_moe.experts.3.w2",
    "qwen3_moe": "mlp.experts.3.down_proj",
    "granitemoe": None,
    "llama4_text": None,
    "nemotron_h": None,
}


@pytest.mark.parametrize("arch", list(DOWN_3))
def test_disk_offload_reads_and_writes_per_expert_checkpoints(arch: str, moe_checkpoint: Path, tmp_path: Path) -> None:
    """The checkpoints hold one linear per expert (and Mixtral's ``block_sparse_moe`` is the model's ``mlp``;
    Nemotron-H's are ungated), or fused experts under other names (GraniteMoE) or transposed (Llama 4), the model fused
    ``experts`` parameters: disk offload reads the experts from the checkpoint and writes them back as the in-memory
    run does."""
    source = moe_checkpoint
    if arch != "mixtral":
        source = tmp_path / arch
        extra = {
            "llama4_text": {"intermediate_size_mlp": 128},
            "nemotron_h": {"moe_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64},
        }.get(arch, {"moe_intermediate_size": 64})
        tiny_model(arch, vocab_size=49152, hidden_size=64, intermediate_size=128, **extra).save_pretrained(source)
        AutoTokenizer.from_pretrained(moe_checkpoint).save_pretrained(source)
    options = CalibrationOptions(scheme=QuantScheme(bits=4, group_size=32), all_experts=True)

    def job(name: str, **kwargs: object) -> CalibrationJob:
        return CalibrationJob(
            model_id=str(source),
            save_dir=tmp_path / name,
            num_samples=4,
            seq_len=32,
            batch_size=2,
            options=options,
            **kwargs,
        )

    memory = run_job(job("memory"))
    expected = logits(memory.model)
    disk = run_job(job("disk", offload="disk"))
    assert disk.linears == memory.linears and disk.result.experts == {}
    assert tensor_names(tmp_path / "disk") == tensor_names(tmp_path / "memory")
    if DOWN_3[arch] is not None:
        assert f"model.layers.1.{DOWN_3[arch]}.weight_packed" in tensor_names(tmp_path / "disk")
    if arch == "llama4_text":  # transposed, stored fused: saved as the per-expert linears transformers loads
        assert "model.layers.0.feed_forward.experts.3.down_proj.weight_packed" in tensor_names(tmp_path / "disk")
        assert "model.layers.0.feed_forward.experts.down_proj" not in tensor_names(tmp_path / "disk")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk", dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded), expected)

    if arch == "granitemoe":  # experts a compressed checkpoint holds dense stay unquantized there, not in fake
        assert memory.result.experts == {}
        expected = logits(run_job(job("fake-memory", save_format="fake")).model)
    run_job(job("fake", offload="disk", save_format="fake"))
    assert tensor_names(tmp_path / "fake") == tensor_names(source), "the source checkpoint's own names"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32).eval()
    assert torch.equal(logits(plain), expected)


def test_bfloat16_calibration_saves_and_reloads(checkpoint: Path, tmp_path: Path) -> None:
    """--dtype bfloat16: the model computes in bf16 (GPTQ's solve stays fp32), in memory and from disk alike."""
    options = CalibrationOptions(scheme=QuantScheme(bits=4, group_size=32))
    summary = run_job(
        CalibrationJob(
            model_id=str(checkpoint),
            save_dir=tmp_path / "memory",
            num_samples=4,
            seq_len=32,
            batch_size=2,
            dtype="bfloat16",
            options=options,
        )
    )
    assert {p.dtype for p in summary.model.parameters()} == {torch.bfloat16}
    expected = logits(summary.model)
    with safe_open(tmp_path / "memory" / "model.safetensors", "pt") as saved:
        assert saved.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.bfloat16
    run_job(
        CalibrationJob(
            model_id=str(checkpoint),
            save_dir=tmp_path / "disk",
            num_samples=4,
            seq_len=32,
            batch_size=2,
            dtype="bfloat16",
            offload="disk",
            options=options,
        )
    )
    for saved in ("memory", "disk"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / saved, dtype=torch.bfloat16).eval()
        assert torch.equal(logits(reloaded), expected), saved


def test_default_dtype_is_the_checkpoints_on_cuda_fp32_on_cpu(tmp_path: Path) -> None:
    from seqgen.errors import SeqgenError
    from seqgen.job import model_dtype

    tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16).to(torch.bfloat16).save_pretrained(tmp_path)
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")  # only the device's type is read
    assert model_dtype(None, str(tmp_path), cuda) == model_dtype("auto", str(tmp_path), cpu) == torch.bfloat16
    assert model_dtype(None, str(tmp_path), cpu) == torch.float32
    assert model_dtype("float16", str(tmp_path), cuda) == torch.float16
    with pytest.raises(
        SeqgenError, match=r"^dtype='fp8' is not a choice: use one of float32, bfloat16, float16, auto\.$"
    ):
        model_dtype("fp8", str(tmp_path), cpu)


def test_job_options_take_plain_strings_and_refuse_typos(tmp_path: Path) -> None:
    from seqgen.choices import DType, Offload, SaveFormat
    from seqgen.errors import SeqgenError

    job = CalibrationJob("m", tmp_path, offload="disk", save_format="fake", dtype="bfloat16")
    assert (job.offload, job.save_format, job.dtype) == (Offload.DISK, SaveFormat.FAKE, DType.BFLOAT16)
    assert CalibrationJob("m", tmp_path).dtype is None
    for field, value, choices in [
        ("offload", "dsik", "memory, disk"),
        ("save_format", "compresed", "compressed, fake"),
        ("dtype", "fp16", "float32, bfloat16, float16, auto"),
    ]:
        message = f"CalibrationJob.{field}='{value}' is not a choice: use one of {choices}."
        with pytest.raises(SeqgenError, match=f"^{re.escape(message)}$"):
            CalibrationJob("m", tmp_path, **{field: value})
    with pytest.raises(SeqgenError, match=r"^unknown quantization algorithm 'gtpq'; known algorithms: gptq, rtn\."):
        CalibrationJob("m", tmp_path, options=CalibrationOptions(algorithm="gtpq"))


CLI_DEFAULTS_G16 = QuantScheme(bits=4, group_size=16, symmetric=True, act_order=True, dampening=0.01)


def test_vision_language_checkpoint_calibrates_on_text(checkpoint: Path, tmp_path: Path) -> None:
    """Qwen2.5-VL, which only AutoModelForImageTextToText builds: the language model's layers are calibrated on text,
    the vision tower stays in full precision and is listed in ``ignore``; memory and disk offload save the same,
    with the image processor's files that a server needs."""
    import json

    from transformers import AutoModelForImageTextToText

    from seqgen.verify import checkpoint_differences

    source = tmp_path / "qwen2_5_vl"
    tiny_model("qwen2_5_vl", text_config={"vocab_size": 49152, "intermediate_size": 64}).save_pretrained(source)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(source)
    processor = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2}
    (source / "preprocessor_config.json").write_text(json.dumps(processor))
    memory = run_job(
        CalibrationJob(
            model_id=str(source),
            save_dir=tmp_path / "memory",
            num_samples=4,
            seq_len=32,
            batch_size=2,
            options=CalibrationOptions(scheme=CLI_DEFAULTS_G16),
        )
    )
    assert sorted(memory.result.quantized) == sorted(
        f"model.language_model.layers.{i}.{name}"
        for i in range(2)
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    config = (tmp_path / "memory" / "config.json").read_text()
    assert '"model.visual.blocks.0.attn.qkv"' in config and '"lm_head"' in config  # ignored: kept dense
    names = tensor_names(tmp_path / "memory")
    assert "visual.blocks.0.attn.qkv.weight" in names and "model.layers.0.self_attn.q_proj.weight_packed" in names
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "memory", dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded), logits(memory.model))

    result = CliRunner().invoke(
        cli,
        [
            "calibrate",
            "--model",
            str(source),
            "--algorithm",
            "gptq",
            "--bits",
            "4",
            "--group-size",
            "16",
            "--num-samples",
            "4",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--offload",
            "disk",
            "--save",
            str(tmp_path / "disk"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert checkpoint_differences(tmp_path / "memory", tmp_path / "disk") == []
    for saved in ("memory", "disk"):
        assert json.loads((tmp_path / saved / "preprocessor_config.json").read_text()) == processor


def test_disk_offload_reads_experts_stored_transposed(moe_checkpoint: Path, tmp_path: Path) -> None:
    """Qwen3-VL-MoE checkpoints store fused experts [experts, in, out], the model [experts, out, in]; transformers
    transposes while loading. Disk offload reads them the same way: it calibrates what the in-memory run does (fake
    format, where the experts are quantized, and written back in the checkpoint's layout)."""
    from safetensors.torch import load_file, save_file

    from seqgen.verify import checkpoint_differences

    source = tmp_path / "qwen3_vl_moe"
    tiny_model("qwen3_vl_moe", text_config={"vocab_size": 49152, "moe_intermediate_size": 32}).save_pretrained(source)
    AutoTokenizer.from_pretrained(moe_checkpoint).save_pretrained(source)
    stored = load_file(source / "model.safetensors")
    experts = [key for key in stored if key.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts
    save_file(
        {key: t.mT.contiguous() if key in experts else t for key, t in stored.items()},
        source / "model.safetensors",
        metadata={"format": "pt"},
    )
    options = CalibrationOptions(scheme=QuantScheme(bits=4, group_size=16), all_experts=True)

    def job(name: str, **kwargs: object) -> CalibrationJob:
        return CalibrationJob(
            model_id=str(source),
            save_dir=tmp_path / name,
            num_samples=4,
            seq_len=32,
            batch_size=2,
            options=options,
            save_format="fake",
            **kwargs,
        )

    memory = run_job(job("memory"))
    assert memory.result.experts, "the fused experts were calibrated"
    run_job(job("disk", offload="disk"))
    assert checkpoint_differences(tmp_path / "memory", tmp_path / "disk") == []


def test_experts_a_compressed_checkpoint_cannot_pack_stay_unquantized(
    moe_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers saves Qwen3-VL-MoE's experts fused, and compressed-tensors packs no fused experts: quantized,
    they would be saved dequantized (W4's error at bf16's size), so a compressed job leaves them exact and says so;
    the fake format, all dequantized anyway, quantizes them."""
    import dataclasses

    source = tmp_path / "qwen3_vl_moe"
    model = tiny_model("qwen3_vl_moe", text_config={"vocab_size": 49152, "moe_intermediate_size": 32})
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(moe_checkpoint).save_pretrained(source)
    experts = "model.language_model.layers.0.mlp.experts"
    original = model.get_submodule(experts).down_proj.detach().clone()
    job = CalibrationJob(
        model_id=str(source),
        save_dir=tmp_path / "compressed",
        num_samples=4,
        seq_len=32,
        batch_size=2,
        options=CalibrationOptions(scheme=QuantScheme(bits=4, group_size=16)),
    )
    with caplog.at_level("WARNING", logger="seqgen"):
        compressed = run_job(job)
    assert compressed.result.experts == {} and len(compressed.result.quantized) == 8  # q/k/v/o of 2 layers
    assert f"2 fused experts modules ({experts}, ...) stay unquantized" in caplog.text
    assert "saved dequantized (full size)" not in caplog.text  # the save found nothing to dequantize
    assert torch.equal(compressed.model.get_submodule(experts).down_proj, original)

    fake = run_job(dataclasses.replace(job, save_dir=tmp_path / "fake", save_format="fake"))
    assert len(fake.result.experts) == 2 * 2 * 4  # layers x (gate_up, down) x experts


@pytest.mark.slow  # two CLI calibrations: test_blocktune.py covers tuning itself
def test_block_tuning_at_three_bits_saves_the_layout_of_the_algorithm_alone(checkpoint: Path, tmp_path: Path) -> None:
    """``--tune-iterations`` tunes after the algorithm and saves what it saves; ``--bits 3`` is accepted."""
    runner = CliRunner()
    args = ["calibrate", "--model", str(checkpoint), *ARGS, "--bits", "3", "--algorithm", "rtn"]
    plain = runner.invoke(cli, [*args, "--save", str(tmp_path / "rtn")])
    tuned = runner.invoke(cli, [*args, "--tune-iterations", "3", "--tune-seed", "1", "--save", str(tmp_path / "tuned")])
    assert plain.exit_code == 0 and tuned.exit_code == 0, tuned.output
    assert "with rtn + block tuning (3 iterations) W3 group 32" in tuned.output and "tune " in tuned.output
    assert tensor_names(tmp_path / "tuned") == tensor_names(tmp_path / "rtn")
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    assert torch.isfinite(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "tuned"))).all()
