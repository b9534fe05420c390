"""bench/gpu_scale.py runs on the CPU with a tiny shape, and its FLOP floors count what torch's FLOP counter counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def gpu_scale() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_scale.py"
    spec = importlib.util.spec_from_file_location("gpu_scale", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_shape_calibrates_on_the_cpu(gpu_scale: ModuleType, tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "row.json"
    row = gpu_scale.main(
        ["--shape", "tiny", "--device", "cpu", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
        + ["--peak-tflops", "1", "--json", str(out)]
    )
    layers = gpu_scale.SHAPES["tiny"]["num_hidden_layers"]
    assert row["linears"] == 7 * layers and row["samples"] == 4 and row["ranks"] == 1
    assert set(row["phases"]) >= {"calibrate", "compress", "propagate"} and out.is_file()
    printed = capsys.readouterr().out
    assert all(phase in printed for phase in row["phases"]) and "wall" in printed


def test_forward_floor_is_torchs_flop_count_with_causal_attention_halved(gpu_scale: ModuleType) -> None:
    """A layer's forward, counted by torch.utils.flop_counter with eager attention (whole score matrices, masked
    after the matmul): the floor's linears and twice its causal attention."""
    from torch.utils.flop_counter import FlopCounterMode

    model = gpu_scale.build_model("tiny", layers=1).float()
    model.set_attn_implementation("eager")  # the counter does not see the CPU's fused attention kernel
    samples, seq_len = 2, 16
    ids = torch.randint(0, model.config.vocab_size, (samples, seq_len))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.model(input_ids=ids)
    tokens, hidden = samples * seq_len, model.config.hidden_size
    attention = gpu_scale.causal_attention_flops(hidden, tokens, seq_len)
    floors = gpu_scale.flop_floors(model.config, tokens, seq_len)
    assert counter.get_total_flops() == floors["propagate"] + attention
