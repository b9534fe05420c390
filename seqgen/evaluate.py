"""Perplexity of a causal LM on fixed-length token samples (see :func:`seqgen.data.pack`)."""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from .errors import SeqgenError

__all__ = ["perplexity"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    samples: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every predicted token of ``samples``.

    ``samples`` is an int64 tensor ``[N, L]`` of full-length windows (no padding): each row predicts its tokens
    1..L-1 from the ones before, ``N * (L - 1)`` predictions in all. Logits are scored in fp32 and the sum is
    accumulated in fp64 whatever the model's dtype. ``device`` defaults to the device of the model's first parameter.
    """
    if samples.ndim != 2 or samples.shape[1] < 2:
        raise SeqgenError(
            f"perplexity needs samples of shape [num_samples, seq_len] with seq_len >= 2, got {tuple(samples.shape)}."
        )
    if batch_size < 1:
        raise SeqgenError(f"perplexity batch_size must be at least 1, got {batch_size}.")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for chunk in tqdm(samples.split(batch_size, dim=0), desc="perplexity", unit="batch", leave=False):
            input_ids = chunk.to(device=device, dtype=torch.int64)
            logits = model(input_ids=input_ids, use_cache=False).logits
            predicted = logits[:, :-1, :].float()
            targets = input_ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += nll.double().item()
            total_tokens += targets.numel()
            del logits, predicted
    finally:
        model.train(was_training)
    result = math.exp(total_nll / total_tokens)
    logger.info("perplexity %.4f over %d tokens (%d samples of %d)", result, total_tokens, *samples.shape)
    return result
