"""nanor1.sample, the sampler of every rollout, against the distribution it is given. It runs no
model code, so it carries no assignment marker."""
import pytest
import torch

import nanor1


def test_sample_draws_each_token_with_its_probability():
    """nanor1.sample against the distribution it is given: counts within 5 binomial standard
    deviations of n * p for every token, never a zero-probability token (first, middle or last)."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0],
                          [0.5, 0.0, 0.0, 0.0, 0.0, 0.5],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                          [1 / 6] * 6], dtype=torch.float32)
    n = 40_000
    drawn = nanor1.sample(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, len(probs))
    for row, p in enumerate(probs.double()):
        counts = torch.bincount(drawn[:, row], minlength=len(p)).double()
        assert (counts[p == 0] == 0).all(), f"row {row}: a zero-probability token was drawn"
        sd = (n * p * (1 - p)).sqrt()
        assert ((counts - n * p).abs() <= 5 * sd + 1e-9).all(), f"row {row}: {counts.tolist()} vs {(n * p).tolist()}"


def test_sample_refuses_non_finite_probabilities():
    """NaN logits (a corrupted checkpoint) must stop rollouts with a clear error, not yield tokens."""
    probs = torch.tensor([[0.5, 0.5], [float("nan"), 0.5]])
    with pytest.raises(SystemExit, match="^error: .*NaN or infinite"):
        nanor1.sample(probs, torch.Generator().manual_seed(0))
