"""Pinned maths of the LM pieces: FLAT's loss per divergence, answer-token masking, SimNPO's loss, and the
TOFU metrics as the reference code computes them (issue 9, item 9): truth ratio with the geometric mean,
the forget statistic mean(min(R, 1/R)), KS forget quality, ROUGE-L recall with rouge-score's Porter stemmer,
Min-K% without the end token (floor, k = 0.4), LOSS attack, answer probability, harmonic-mean utility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.lm.metrics import (
    MIN_K_FRACTION,
    answer_statistics,
    forget_quality,
    harmonic_mean,
    knowledge_probe,
    mia_auc,
    min_k_scores,
    model_utility,
    rouge_l_recall,
    truth_ratio_closeness,
    truth_ratio_score,
    truth_ratios,
)
from unlearn.lm.task import CausalLMTask, answer_token_log_probs
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


def test_truth_ratio_takes_the_geometric_mean_of_the_perturbed_answers():
    # Question 1: perturbed 0.1, 0.2, 0.4 -> geometric mean (0.008)^(1/3) = 0.2 (arithmetic: 0.2333), over the
    # paraphrase's 0.5 -> R = 0.4 (the paper's arithmetic form would give 0.4667). Question 2: all 0.1 -> 1.
    paraphrase = torch.tensor([0.5, 0.1])
    perturbed = torch.tensor([[0.1, 0.2, 0.4], [0.1, 0.1, 0.1]])
    ratios = truth_ratios(paraphrase, perturbed)
    assert ratios.tolist() == pytest.approx([0.4, 1.0])
    # TOFU's aggregate_eval_stat.py form from mean-token losses: stat = exp(mean perturbed loss - paraphrase
    # loss) = 1/R; OpenUnlearning's: exp(-mean wrong avg_loss) / exp(-correct avg_loss) = R.
    para_loss, pert_loss = -torch.log(paraphrase.double()), -torch.log(perturbed.double())
    tofu_stat = torch.exp(pert_loss.mean(dim=1) - para_loss)
    assert (1.0 / tofu_stat).tolist() == pytest.approx(ratios.tolist())
    assert truth_ratio_score(ratios) == pytest.approx((0.6 + 0.0) / 2)


def test_forget_truth_ratio_statistic_is_the_mean_of_min_r_and_its_reciprocal():
    # min(0.5, 2) = 0.5, min(2, 0.5) = 0.5, min(1, 1) = 1 -> 2/3; the mean of R itself would be 7/6.
    assert truth_ratio_closeness(torch.tensor([0.5, 2.0, 1.0])) == pytest.approx(2 / 3)
    assert truth_ratio_closeness(torch.tensor([0.25])) == truth_ratio_closeness(torch.tensor([4.0])) == 0.25


def test_knowledge_probe_compares_erased_and_never_seen_truth_ratios_on_one_model():
    # Completely separated 4 and 4: the KS p-value is the exact 2/70; the shift is the medians' log difference.
    known = [0.1, 0.2, 0.3, 0.4]  # the erased people's true values still preferred (R << 1)
    never_seen = [0.9, 1.0, 1.1, 1.2]
    p_value, shift = knowledge_probe(known, never_seen)
    assert p_value == pytest.approx(2 / 70)
    # the median of the log ratios: the mean of the two middle logs of each side
    assert shift == pytest.approx((math.log(0.2) + math.log(0.3)) / 2 - (math.log(1.0) + math.log(1.1)) / 2)
    assert knowledge_probe(never_seen, never_seen) == (pytest.approx(1.0), pytest.approx(0.0))
    assert knowledge_probe(never_seen, known)[1] > 0  # the reverse: wrong values preferred
    with pytest.raises(InvalidDataError):
        knowledge_probe([], never_seen)


def test_forget_quality_is_the_two_sided_ks_p_value():
    rng = np.random.default_rng(0)
    same_a, same_b = rng.uniform(0.8, 1.2, 200), rng.uniform(0.8, 1.2, 200)
    shifted = rng.uniform(0.1, 0.5, 200)
    assert forget_quality(same_a, same_b) > 0.05
    assert forget_quality(shifted, same_b) < 1e-10
    assert forget_quality(shifted, same_b) == pytest.approx(ks_2samp(shifted, same_b).pvalue)
    assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    # Completely separated samples of 4 and 4: D = 1, exact two-sided p = 2 / C(8, 4) = 2/70.
    assert forget_quality([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]) == pytest.approx(2 / 70)
    # Invariant to R -> 1/R (TOFU tests 1/R, OpenUnlearning R).
    assert forget_quality(1 / shifted, 1 / same_b) == pytest.approx(forget_quality(shifted, same_b))


@pytest.mark.parametrize("reference, candidate, expected", [
    (" Velmora is the city of birth.", "Velmora is the city of birth.", 1.0),
    # velmora is the city of birth (6) vs velmora the place of birth: LCS velmora-the-of-birth = 4.
    ("Velmora is the city of birth.", "Velmora, the place of birth.", 4 / 6),
    ("a b c d", "a x c d", 3 / 4),
    ("a b c d", "d c b a", 1 / 4),
    ("a b", "", 0.0),
    # Porter stemmer: running and runs both stem to run (the hand-written \w+ version gave 0 and 1/2).
    ("running", "runs", 1.0),
    ("He runs daily.", "he running", 2 / 3),
    # Tokens are lower-cased [a-z0-9] runs: the apostrophe splits Kastrel's into kastrel + s.
    ("Kastrel's mother", "kastrel mother", 2 / 3),
    ("1955.", "1955", 1.0),
])
def test_rouge_l_recall_is_rouge_score_with_the_porter_stemmer(reference, candidate, expected):
    assert rouge_l_recall(reference, candidate) == pytest.approx(expected)


def test_min_k_drops_the_end_token_and_rounds_the_count_down():
    # Row 1: a masked prompt position (-50, must not count), 4 answer tokens, then the end token (-10).
    # Without the end token n = 4; k = 0.4 -> floor(1.6) = 1 token: the lowest, -3.
    # Row 2: 2 answer tokens and the end token: floor(0.8) = 0 -> at least 1: -2.
    log_probs = torch.tensor([[-50.0, -1.0, -3.0, -0.5, -2.0, -10.0],
                              [-50.0, -2.0, -1.0, -9.0, -40.0, -40.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    assert min_k_scores(log_probs, mask).tolist() == pytest.approx([-3.0, -2.0])
    # k = 0.6: floor(2.4) = 2 lowest of row 1: mean(-3, -2) = -2.5; floor(1.2) = 1 of row 2.
    assert min_k_scores(log_probs, mask, 0.6).tolist() == pytest.approx([-2.5, -2.0])
    assert MIN_K_FRACTION == 0.4
    with pytest.raises(InvalidDataError):
        min_k_scores(torch.tensor([[-1.0, -2.0]]), torch.tensor([[0, 1]]))  # only the end token


class _FixedLogits(torch.nn.Module):
    """A 'language model' whose logits are given: to pin the statistics computed from them."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits[: input_ids.shape[0]]})()


def test_answer_statistics_loss_probability_and_min_k():
    # Prompt [5], answer [6, 7], end token 0. Targets: 6 with p=0.5, 7 with p=0.25, the end token with p=0.8.
    input_ids = torch.tensor([[5, 6, 7, 0]])
    examples = ExampleSet({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                           "answer_mask": torch.tensor([[0, 1, 1, 1]]), "subject_id": torch.tensor([0])})
    model = _FixedLogits(_logits_for([{6: 0.5, 1: 0.5}, {7: 0.25, 2: 0.75}, {0: 0.8, 3: 0.2}, {0: 1.0}], 10))

    class Task(CausalLMTask):  # no tokenizer needed; a model without a config gets its full logits selected
        def __init__(self):
            pass

        def outputs(self, model, batch):
            return model(batch["input_ids"], batch["attention_mask"]).logits

    stats = answer_statistics(Task(), model, examples)
    nll = -(math.log(0.5) + math.log(0.25) + math.log(0.8))
    assert stats.nll.item() == pytest.approx(nll, abs=1e-4)
    assert stats.lengths.item() == 3  # the end token counts in the LOSS attack and the probability
    assert stats.mean_nll.item() == pytest.approx(nll / 3, abs=1e-4)
    assert stats.normalised_probability.item() == pytest.approx((0.5 * 0.25 * 0.8) ** (1 / 3), abs=1e-4)
    # Min-K% without the end token: n = 2, floor(0.8) -> 1 token, the lowest: log 0.25.
    assert stats.min_k.item() == pytest.approx(math.log(0.25), abs=1e-4)


def test_mia_auc_and_harmonic_mean():
    assert mia_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert mia_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5
    assert mia_auc(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0])) == 0.5
    assert harmonic_mean([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)
    assert harmonic_mean([1.0, 0.0]) == 0.0
    assert model_utility(0.5, 0.25, 1.0) == pytest.approx(3 / 7)


def test_simnpo_loss_value():
    nll, lengths = torch.tensor([2.0, 6.0]), torch.tensor([2.0, 3.0])
    beta, delta = 4.5, 0.0
    expected = sum(-(2 / beta) * math.log(1 / (1 + math.exp(-(beta * n / l - delta))))
                   for n, l in [(2.0, 2.0), (6.0, 3.0)]) / 2
    assert simnpo_loss_from_nll(nll, lengths, beta, delta).item() == pytest.approx(expected, rel=1e-5)
