"""Block tuning: it starts exactly where its algorithm ended, lowers every layer's output error against the eager
full-precision layer, is deterministic for a seed, and saves the checkpoint layout GPTQ saves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import seqgen
from seqgen.algorithms import QuantScheme, get_algorithm
from seqgen.algorithms.blocktune import TunedWeight, TuneOptions, output_tensors
from seqgen.checkpoint import save_quantized
from seqgen.emitter import emit_model
from seqgen.models import meta_model, tiny_model
from seqgen.runtime import CalibrationOptions, calibrate
from seqgen.verify import random_batch

SIZES = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "num_hidden_layers": 3}
SCHEME = QuantScheme(bits=3, group_size=32)
TUNE = TuneOptions(iterations=40)


def model() -> torch.nn.Module:
    return tiny_model("llama", **SIZES)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> seqgen.Package:
    return seqgen.load(emit_model(meta_model(model().config), tmp_path_factory.mktemp("pkg") / "p").path)


def batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    return [random_batch(99, 4, 24, seed=i) for i in range(n)]


@pytest.mark.parametrize(
    "scheme",
    [SCHEME, QuantScheme(bits=4, group_size=32, symmetric=False), QuantScheme(bits=4, group_size=32, act_order=True)],
    ids=["w3-sym", "w4-asym", "w4-actorder"],
)
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_untuned_parameters_give_back_the_start_exactly(algorithm: str, scheme: QuantScheme) -> None:
    """Offsets 0 and clipping 1 are the starting algorithm's codes, scales and weight, bit for bit."""
    algo = get_algorithm(algorithm, scheme)
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    stats = algo.new_statistics(64, torch.device("cpu"))
    if stats is not None:
        stats.update(torch.randn(200, 64, generator=torch.Generator().manual_seed(1)))
    start = algo.quantize(weight, stats)
    tuned = TunedWeight(weight, start)
    again = tuned.quantized(weight)
    for field in ("codes", "scale", "zero_point", "g_idx"):
        a, b = getattr(again, field), getattr(start, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert torch.equal(tuned(weight), start.dequantize())


def _layer_calls(source: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> list[list[tuple[tuple, dict]]]:
    """Per decoder layer of ``source``, the arguments of its calls on ``data``."""
    layers = source.model.layers
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    hooks = [
        layer.register_forward_pre_hook(lambda _, args, kwargs, i=i: calls[i].append((args, kwargs)), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for batch in data:
            source(**batch, use_cache=False)
    for hook in hooks:
        hook.remove()
    return calls


def _layer_errors(
    models: dict[str, torch.nn.Module], reference: torch.nn.Module, calls: list[list[tuple[tuple, dict]]]
) -> dict[str, list[float]]:
    """Each model's mean squared output error per layer against ``reference``'s layer, on the same inputs."""

    def out(m: torch.nn.Module, i: int, call: tuple[tuple, dict]) -> Any:
        with torch.no_grad():
            return output_tensors(m.model.layers[i](*call[0], **call[1]))[0]

    return {
        name: [
            sum((out(m, i, call) - out(reference, i, call)).pow(2).mean().item() for call in layer_calls)
            for i, layer_calls in enumerate(calls)
        ]
        for name, m in models.items()
    }


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_tuning_lowers_every_layers_output_error_below_its_start(package: seqgen.Package, algorithm: str) -> None:
    """On the calibration inputs each layer saw, its output error against the eager full-precision layer is below
    that of the starting algorithm's weights. RTN's weights are data-free: every layer is compared. GPTQ's depend on
    the layer's inputs, which the quantized layers before it change: the first layer is compared (its inputs are the
    embeddings in both runs), and the tuning reports."""
    data = batches()
    start, tuned = model(), model()
    calibrate(start, package, data, CalibrationOptions(algorithm=algorithm, scheme=SCHEME))
    result = calibrate(tuned, package, data, CalibrationOptions(algorithm=algorithm, scheme=SCHEME, tune=TUNE))
    calls = _layer_calls(tuned, data)
    if algorithm == "gptq":
        calls = calls[:1]
    errors = _layer_errors({"start": start, "tuned": tuned}, model(), calls)
    assert all(t < s for t, s in zip(errors["tuned"], errors["start"], strict=True)), errors
    assert list(result.tuned) == [sg.name for sg in package.subgraphs[1:4]]
    if algorithm == "rtn":
        assert all(r.tuned < r.start for r in result.tuned.values()), result.tuned
    else:  # from GPTQ, tuning does not lower every layer's error (the README says so); there the start is kept
        assert any(r.tuned < r.start for r in result.tuned.values()), result.tuned
    assert "tune" in result.phase_seconds()


def test_the_same_seed_gives_the_same_codes(package: seqgen.Package) -> None:
    """Two runs with one seed give bitwise the same codes and scales; another seed visits the batches in another
    order and ends elsewhere."""

    def codes(seed: int) -> dict[str, Any]:
        options = CalibrationOptions(algorithm="rtn", scheme=SCHEME, tune=TuneOptions(iterations=12, seed=seed))
        return calibrate(model(), package, batches(), options).quantized

    first, second, other = codes(0), codes(0), codes(1)
    for name, q in first.items():
        assert torch.equal(q.codes, second[name].codes) and torch.equal(q.scale, second[name].scale), name
    assert any(not torch.equal(q.codes, other[name].codes) for name, q in first.items())


def _layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_slice(key)
                found[key] = (tensor.get_dtype(), tuple(tensor.get_shape()))
    return found


def test_checkpoint_has_gptqs_tensor_names_dtypes_and_shapes(package: seqgen.Package, tmp_path: Path) -> None:
    saved = {}
    for label, tune in {"gptq": None, "tuned": TuneOptions(iterations=5)}.items():
        m = model()
        options = CalibrationOptions(algorithm="gptq", scheme=QuantScheme(bits=4, group_size=32), tune=tune)
        result = calibrate(m, package, batches(2), options)
        saved[label] = save_quantized(m, result.quantized, tmp_path / label)
    assert _layout(saved["tuned"]) == _layout(saved["gptq"])
    configs = [json.loads((path / "config.json").read_text())["quantization_config"] for path in saved.values()]
    assert configs[0] == configs[1]
