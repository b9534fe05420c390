"""Perplexity: exp of the mean next-token NLL, equal to a direct computation from the logits."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from seqgen.errors import SeqgenError
from seqgen.evaluate import perplexity
from seqgen.models import tiny_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def samples(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (7, 12), generator=generator)


def test_untrained_model_is_near_uniform(model, samples) -> None:
    value = perplexity(model, samples, batch_size=4)
    vocab = model.config.vocab_size
    assert math.isfinite(value)
    assert vocab / 2 < value < vocab * 2, (value, vocab)


def test_equals_direct_computation(model, samples, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="seqgen.evaluate")
    with torch.no_grad():
        logits = model(input_ids=samples).logits.double()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logprobs.gather(-1, samples[:, 1:, None]).squeeze(-1)
    expected = math.exp(nll.mean().item())
    # 7 samples in batches of 3: the last batch is smaller, every predicted token still counts once
    assert perplexity(model, samples, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, samples, batch_size=100) == pytest.approx(expected, rel=1e-5)
    assert f"over {7 * 11} tokens" in caplog.text


def test_keeps_training_mode(model, samples) -> None:
    model.train()
    try:
        perplexity(model, samples[:2])
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("shape", [(4,), (3, 1)])
def test_rejects_samples_without_predictions(model, shape: tuple[int, ...]) -> None:
    with pytest.raises(SeqgenError, match="seq_len"):
        perplexity(model, torch.zeros(shape, dtype=torch.int64))
