"""Sampling.probs against an independent implementation of the same rules: transformers' logits warpers
(TemperatureLogitsWarper, then TopKLogitsWarper, then TopPLogitsWarper, the order its generate() applies them), then
a softmax. Random logits, logits with many ties (integers from a small range), and the edge values: top_k 0 / None /
1 / at or above the vocabulary, top_p 1."""
import itertools

import pytest
import torch

from sampling import Sampling, sample_from

VOCAB = 64


def reference_probs(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:  # transformers' own convention: 0 or None means no top-k
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


def logits_sets():
    g = torch.Generator().manual_seed(0)
    yield "random", torch.randn(16, VOCAB, generator=g) * 3
    yield "ties", torch.randint(0, 4, (16, VOCAB), generator=g).float()  # 4 distinct values: ties everywhere
    yield "one_hot_ish", torch.full((4, VOCAB), -5.0).index_fill_(1, torch.tensor([7]), 5.0)


@pytest.mark.parametrize("temperature, top_k, top_p", list(itertools.product(
    [0.5, 1.0, 1.7], [None, 0, 1, 5, 17, VOCAB, VOCAB + 10], [None, 0.07, 0.33, 0.87, 1.0])))
def test_probs_match_transformers_warpers(temperature, top_k, top_p):
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    for name, logits in logits_sets():
        ours = sampling.probs(logits)
        reference = reference_probs(logits, temperature, top_k, top_p)
        if name != "random" and top_p is not None and top_p < 1:
            ours, reference = ours.sort(-1).values, reference.sort(-1).values
        assert torch.allclose(ours, reference, atol=1e-6, rtol=1e-5), (name, (ours - reference).abs().max())
        assert torch.equal(ours > 0, reference > 0), name  # the same tokens (or, above, as many) kept


def test_greedy_is_the_argmax():
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(1))
    probs = Sampling(temperature=0, top_k=3, top_p=0.5, seed=0).probs(logits)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(probs.sum(-1), torch.ones(8))


def test_greedy_sample_is_the_one_hot_draw_ties_included():
    """Plain decoding's greedy sample() skips the one-hot that speculation's probs() builds: the same token, ties
    and bf16 logits included."""
    sampling = Sampling(temperature=0)
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    logits[0, :] = 0  # all tied
    logits[1, [3, VOCAB - 1]] = 100  # two tied maxima
    assert torch.equal(sampling.sample(logits), sampling.draw(sampling.probs(logits)))
    assert torch.equal(sampling.sample(logits), logits.float().argmax(-1))  # the first of tied maxima


def test_sample_from_draws_each_token_at_its_weight(monkeypatch):
    """Rows of weights (unnormalised, zeros among them): each token is drawn at its share of its row's weight
    (chi-square, 5 sd), a token of weight 0 never, not even at the smallest or largest uniform draw."""
    weights = torch.tensor([[0.0, 0.1, 0.0, 0.3, 0.6, 0.0], [2.0, 0.0, 0.0, 1.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    tokens = torch.stack([sample_from(weights, generator) for _ in range(draws)])  # [draws, 2]
    for row in range(2):
        counts = torch.bincount(tokens[:, row], minlength=6).double()
        expected = weights[row].double() / weights[row].sum() * draws
        assert torch.all(counts[expected == 0] == 0)
        kept = expected > 0
        chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
        dof = int(kept.sum()) - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, (row, counts)
    top = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0])
    for uniform, token in ((0.0, 1), (1 - 2 ** -53, 2)):  # torch.rand's smallest and largest doubles
        monkeypatch.setattr(torch, "rand", lambda shape, uniform=uniform, **_: torch.full(shape, uniform,
                                                                                          dtype=torch.float64))
        assert int(sample_from(top, None)) == token
        assert int(sample_from(top * 3.7, None)) == token
