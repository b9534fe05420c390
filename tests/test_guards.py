"""Guards: a control-flow decision frozen at trace time is re-checked on every batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import seqgen
from seqgen.emitter import EmitOptions, emit_model
from seqgen.models import TINY_SEED, tiny_config
from seqgen.verify import random_batch

WINDOW = 16


class WindowedLlama(LlamaForCausalLM):
    """Keeps only the last `window` tokens when the input is longer: a branch on sequence length."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if input_ids.shape[1] > self.config.window:
            input_ids = input_ids[:, -self.config.window :]
            attention_mask = attention_mask[:, -self.config.window :]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def windowed_model(device: str = "cpu") -> WindowedLlama:
    config = tiny_config("llama")
    config.window = WINDOW
    torch.manual_seed(TINY_SEED)
    with torch.device(device):
        return WindowedLlama(config).eval()


@pytest.fixture()
def package(tmp_path: Path) -> seqgen.Package:
    result = emit_model(windowed_model("meta"), tmp_path / "pkg", EmitOptions(sample_shape=(2, 64)))
    assert [g["expected"] for g in result.index["guards"]] == [True]
    assert result.index["guards"][0]["code"] == "if input_ids.shape[1] > self.config.window:"
    return seqgen.load(result.path)


def test_guard_is_in_the_generated_code(package: seqgen.Package) -> None:
    head = (package.path / "subgraph_000.py").read_text()
    assert "guard(" in head and "if input_ids.shape[1] > self.config.window:" in head


def test_batch_on_the_same_side_of_the_branch_runs_exactly(package: seqgen.Package) -> None:
    model = windowed_model()
    batch = random_batch(99, 3, 40)
    with torch.no_grad():
        assert torch.equal(package.run(model, **batch)["logits"], model(**batch).logits)


def test_batch_on_the_other_side_raises_a_guard_error(package: seqgen.Package) -> None:
    model = windowed_model()
    with pytest.raises(
        seqgen.GuardError, match=r"guard failed at test_guards\.py:\d+: .* Re-emit with a representative sample"
    ) as info:
        package.run(model, **random_batch(99, 2, WINDOW - 4))
    assert "input_ids.shape[1] > self.config.window" in str(info.value)
