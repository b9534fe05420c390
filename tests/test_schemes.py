"""compressed-tensors' preset schemes: what they mean here, the round trip of their checkpoints, and `--scheme`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import seqgen
from seqgen.algorithms import ActivationScheme, QuantScheme, scheme_from_preset
from seqgen.algorithms.activations import fake_quantize, quantize_inputs
from seqgen.checkpoint import save_quantized
from seqgen.cli import cli
from seqgen.emitter import emit_model
from seqgen.errors import SeqgenError
from seqgen.models import meta_model, tiny_model
from seqgen.runtime import CalibrationOptions, calibrate
from seqgen.verify import random_batch

SIZES = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}


def model() -> torch.nn.Module:
    return tiny_model("llama", **SIZES)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> seqgen.Package:
    return seqgen.load(emit_model(meta_model(model().config), tmp_path_factory.mktemp("pkg") / "p").path)


def logits(m: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, m.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_presets_are_compressed_tensors_schemes() -> None:
    fp8 = scheme_from_preset("FP8")
    assert (fp8.type, fp8.bits, fp8.per_tensor, fp8.group_size) == ("float", 8, True, None)
    assert fp8.activations == ActivationScheme(bits=8, type="float", strategy="tensor", dynamic=False)
    dynamic = scheme_from_preset("fp8_dynamic")
    assert (dynamic.per_tensor, dynamic.group_size, dynamic.activations.strategy) == (False, None, "token")
    w8a8 = scheme_from_preset("W8A8")
    assert (w8a8.type, w8a8.bits, w8a8.group_size, w8a8.activations.type) == ("int", 8, None, "int")
    assert scheme_from_preset("W4A16_ASYM") == QuantScheme(bits=4, group_size=128, symmetric=False)
    # overrides apply to the weights; other fields pass through
    assert scheme_from_preset("W4A16", group_size=None, dampening=0.1) == QuantScheme(group_size=None, dampening=0.1)
    assert scheme_from_preset("W4A16", bits=8, asym=True) == QuantScheme(bits=8, group_size=128, symmetric=False)
    with pytest.raises(SeqgenError, match="FP8.*symmetric"):
        scheme_from_preset("FP8", asym=True)
    with pytest.raises(SeqgenError, match="NVFP4.*not one seqgen calibrates"):
        scheme_from_preset("NVFP4")


def test_fake_quantized_activations_are_on_the_grid() -> None:
    x = torch.randn(3, 5, 64) * 4
    per_token = fake_quantize(x, ActivationScheme(type="int"))
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.5
    codes = per_token / scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert (per_token - x).abs().le(scale / 2 + 1e-6).all()
    static = ActivationScheme(type="float", strategy="tensor", dynamic=False)
    clipped = fake_quantize(x, static, torch.tensor([0.001]))  # a scale too small: saturates at +-448 steps
    assert clipped.abs().max().item() == pytest.approx(0.448)
    assert torch.equal((clipped / 0.001).to(torch.float8_e4m3fn).float(), (clipped / 0.001).float())


@pytest.mark.parametrize(("preset", "algorithm"), [("FP8", "gptq"), ("FP8_DYNAMIC", "rtn"), ("W8A8", "gptq")])
def test_round_trip_logits_match_the_in_memory_quantized_model(
    package: seqgen.Package, tmp_path: Path, preset: str, algorithm: str
) -> None:
    quantized_model = model()
    scheme = scheme_from_preset(preset)
    batches = [random_batch(99, 4, 24, seed=i) for i in range(2)]
    result = calibrate(quantized_model, package, batches, CalibrationOptions(algorithm=algorithm, scheme=scheme))
    with quantize_inputs(dict(quantized_model.named_modules()), result.quantized):
        expected = logits(quantized_model)
    weights_only = logits(quantized_model)
    out = save_quantized(quantized_model, result.quantized, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == ("int-quantized" if preset == "W8A8" else "float-quantized")
    static = not scheme.activations.dynamic
    for qweight in result.quantized.values():
        assert (qweight.input_scale is not None) == static
        assert qweight.codes.dtype == (torch.float8_e4m3fn if scheme.type == "float" else torch.int8)

    actual = logits(AutoModelForCausalLM.from_pretrained(out).eval())
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert (actual - weights_only).abs().max() > 1e-4  # the reloaded model does quantize its activations


def test_cli_scheme_with_overrides(tmp_path: Path, smollm2_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    source = tmp_path / "tiny"
    tiny_model("llama", vocab_size=49152, **SIZES).save_pretrained(source)
    AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(source)
    args = ["calibrate", "--model", str(source), "--num-samples", "2", "--seq-len", "16", "--algorithm", "rtn"]
    result = CliRunner().invoke(cli, [*args, "--scheme", "W8A8", "--group-size", "32", "--save", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "W8A8 (W8 group 32)" in result.output
    [group] = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert (group["format"], group["weights"]["strategy"], group["weights"]["group_size"]) == (
        "int-quantized",
        "group",
        32,
    )
    assert group["input_activations"]["strategy"] == "token"

    bad = CliRunner().invoke(cli, [*args, "--scheme", "FP8", "--asym", "--save", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "symmetric" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "b").exists()


def test_smoothquant_folding_keeps_the_function_and_maps_norms_to_the_linears_they_feed() -> None:
    from seqgen.algorithms.smoothquant import fold_into_norm
    from seqgen.runtime.smoothing import NormInputs

    m = model()
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n}
    with NormInputs(m, linears) as norms:
        expected = logits(m)
    groups = norms.groups()
    assert sorted(groups) == [
        f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")
    ]
    assert sorted(groups["model.layers.0.input_layernorm"]) == [f"model.layers.0.self_attn.{p}_proj" for p in "kqv"]
    assert sorted(groups["model.layers.1.post_attention_layernorm"]) == [
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    for norm, names in groups.items():
        factors = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 4 + 0.1
        assert fold_into_norm(m.get_submodule(norm), [linears[n] for n in names], factors)
    torch.testing.assert_close(logits(m), expected, rtol=1e-4, atol=1e-4)


def test_smoothquant_w8a8_calibrates_smoothed_weights_and_round_trips(package: seqgen.Package, tmp_path: Path) -> None:
    batches = [random_batch(99, 4, 24, seed=i) for i in range(2)]
    scheme = scheme_from_preset("W8A8")
    plain = model()
    plain_result = calibrate(plain, package, batches, CalibrationOptions(scheme=scheme))
    smoothed = model()
    result = calibrate(smoothed, package, batches, CalibrationOptions(scheme=scheme, smoothquant=0.8))
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(smoothed.get_parameter(norm), plain.get_parameter(norm))  # folded into the norm
    assert not torch.equal(smoothed.get_parameter(norm), model().get_parameter(norm))
    assert torch.equal(smoothed.model.layers[0].self_attn.o_proj.weight, plain.model.layers[0].self_attn.o_proj.weight)
    with quantize_inputs(dict(smoothed.named_modules()), result.quantized):
        expected = logits(smoothed)
    with quantize_inputs(dict(plain.named_modules()), plain_result.quantized):
        assert not torch.equal(logits(plain), expected)
    out = save_quantized(smoothed, result.quantized, tmp_path / "out")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), expected, rtol=0, atol=1e-5)


def test_nvfp4a16_round_trip(package: seqgen.Package, tmp_path: Path) -> None:
    """NVFP4 weights: FP4 codes, FP8 group scales under an fp32 global scale. transformers decompresses them to
    bf16, so the model is bf16: the reloaded weights equal the in-memory ones exactly, the logits to bf16 noise."""
    from seqgen.algorithms.base import round_fp4

    quantized_model = model().to(torch.bfloat16)
    batches = [random_batch(99, 4, 24, seed=i) for i in range(2)]
    options = CalibrationOptions(algorithm="rtn", scheme=scheme_from_preset("NVFP4A16"))
    result = calibrate(quantized_model, package, batches, options)
    for qweight in result.quantized.values():
        codes = qweight.codes.float()
        assert torch.equal(round_fp4(codes.clone()), codes) and codes.abs().max() <= 6
        fp8 = qweight.scale * qweight.global_scale
        # an FP8 value up to fp32 rounding of scale * global, which the cast to FP8 on saving removes
        torch.testing.assert_close(fp8.to(torch.float8_e4m3fn).float(), fp8, rtol=1e-6, atol=0)
    out = save_quantized(quantized_model, result.quantized, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    torch.testing.assert_close(logits(reloaded).float(), logits(quantized_model).float(), rtol=0, atol=2e-2)
    for name in result.quantized:  # decompressed by the first forward pass
        assert torch.equal(reloaded.get_submodule(name).weight, quantized_model.get_submodule(name).weight), name
    with pytest.raises(SeqgenError, match="NVFP4"):
        calibrate(model(), package, batches, CalibrationOptions(algorithm="gptq", scheme=options.scheme))
