"""Pinned maths of the LM pieces: FLAT's loss per divergence, answer-token masking, truth ratio, KS forget
quality, ROUGE-L recall, MIA AUC, SimNPO's loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from unlearn.lm.metrics import (
    forget_quality,
    harmonic_mean,
    mia_auc,
    rouge_l_recall,
    truth_ratio_score,
    truth_ratios,
)
from unlearn.lm.task import answer_token_log_probs
from unlearn.methods.flat import (
    flat_loss_from_probabilities,
    mean_answer_token_probability,
)
from unlearn.methods.simnpo import simnpo_loss_from_nll

P_TEMPLATE = torch.tensor([0.2, 0.5, 0.9])
P_FORGET = torch.tensor([0.8, 0.4, 0.1])


def _direct(divergence: str) -> float:
    """FLAT's loss written out per example with math, from METHODS.md's table."""
    total = 0.0
    for e, f in zip(P_TEMPLATE.tolist(), P_FORGET.tolist()):
        if divergence == "kl":
            total += -e + math.exp(f - 1)
        elif divergence == "pearson":
            total += -e + f * f / 4 + f
        elif divergence == "js":
            total += -(math.log(2) - math.log(1 + math.exp(-e))) + f + math.log(1 + math.exp(-f)) - math.log(2)
        elif divergence == "tv":
            total += -0.5 * math.tanh(e) + 0.5 * math.tanh(f)
    return total / 3


@pytest.mark.parametrize("divergence", ["kl", "js", "pearson", "tv"])
def test_flat_loss_matches_direct_computation(divergence):
    value = flat_loss_from_probabilities(P_TEMPLATE, P_FORGET, divergence)
    assert value.item() == pytest.approx(_direct(divergence), abs=1e-6)


def test_flat_loss_falls_when_template_rises_and_forget_falls():
    for divergence in ("kl", "js", "pearson", "tv"):
        base = flat_loss_from_probabilities(P_TEMPLATE, P_FORGET, divergence)
        better = flat_loss_from_probabilities(P_TEMPLATE + 0.05, P_FORGET - 0.05, divergence)
        assert better < base, divergence


def _logits_for(probabilities_by_position: list[dict[int, float]], vocab: int) -> torch.Tensor:
    logits = torch.full((1, len(probabilities_by_position), vocab), -30.0)
    for position, table in enumerate(probabilities_by_position):
        for token, p in table.items():
            logits[0, position, token] = math.log(p)
    return logits


def test_answer_token_masking_and_mean_probability():
    # Sequence: prompt tokens [5, 6], answer [7, 8], then padding [0]. Logits at t predict token t + 1.
    input_ids = torch.tensor([[5, 6, 7, 8, 0]])
    answer_mask = torch.tensor([[0, 0, 1, 1, 0]])
    vocab = 10
    # position 0 predicts 6 (prompt: masked), position 1 predicts 7 (p=0.5), position 2 predicts 8 (p=0.25),
    # position 3 predicts padding (masked); the prompt token gets a tiny probability that must not count.
    logits = _logits_for([{6: 0.01, 1: 0.99}, {7: 0.5, 2: 0.5}, {8: 0.25, 3: 0.75}, {0: 0.1, 4: 0.9}, {0: 1.0}], vocab)
    log_probs, mask = answer_token_log_probs(logits, input_ids, answer_mask)
    assert mask.tolist() == [[0, 1, 1, 0]]
    nll = -(log_probs * mask).sum().item()
    assert nll == pytest.approx(-math.log(0.5) - math.log(0.25), abs=1e-4)
    probability = mean_answer_token_probability(logits, input_ids, answer_mask)
    assert probability.item() == pytest.approx((0.5 + 0.25) / 2, abs=1e-4)  # per answer token, not per position


def test_truth_ratio_and_score():
    paraphrase = torch.tensor([0.5, 0.1])
    perturbed = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.1, 0.1]])
    ratios = truth_ratios(paraphrase, perturbed)
    assert ratios.tolist() == pytest.approx([0.4, 1.0])
    assert truth_ratio_score(ratios) == pytest.approx((0.6 + 0.0) / 2)


def test_forget_quality_is_the_ks_p_value():
    rng = np.random.default_rng(0)
    same_a, same_b = rng.uniform(0.8, 1.2, 200), rng.uniform(0.8, 1.2, 200)
    shifted = rng.uniform(0.1, 0.5, 200)
    assert forget_quality(same_a, same_b) > 0.05
    assert forget_quality(shifted, same_b) < 1e-10
    assert forget_quality(shifted, same_b) == pytest.approx(ks_2samp(shifted, same_b).pvalue)
    assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_rouge_l_recall():
    assert rouge_l_recall(" Velmora is the city of birth.", "Velmora is the city of birth.") == 1.0
    assert rouge_l_recall("a b c d", "a x c d") == pytest.approx(3 / 4)
    assert rouge_l_recall("a b c d", "d c b a") == pytest.approx(1 / 4)
    assert rouge_l_recall("a b", "") == 0.0


def test_mia_auc_and_harmonic_mean():
    assert mia_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert mia_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5
    assert harmonic_mean([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([1.0, 0.0]) == 0.0


def test_simnpo_loss_value():
    nll, lengths = torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0])
    beta, delta = 4.5, 0.0
    expected = sum(-(2 / beta) * math.log(1 / (1 + math.exp(-(beta * n / l - delta))))
                   for n, l in [(2.0, 2.0), (6.0, 3.0)]) / 2
    assert simnpo_loss_from_nll(nll, lengths, beta, delta).item() == pytest.approx(expected, rel=1e-5)
