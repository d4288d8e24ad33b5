"""TOFU-style evaluation of a causal LM (Maini et al. 2024, arXiv 2401.06121; METHODS.md "Evaluation (causal LM)").

Per question, from :func:`answer_statistics` (answer tokens only, prompt masked):

- answer probability ``P(a|q)^(1/|a|)``: the length-normalised probability of the answer;
- truth ratio ``R = mean_j P(perturbed_j|q)^(1/|p_j|) / P(paraphrase|q)^(1/|a~|)``: below 1 when the model
  prefers the true fact in a wording it was not trained on; about 1 for a person it never saw;
- ROUGE-L recall of the greedy answer against the reference answer (:func:`rouge_l_recall`, implemented here
  on lower-cased word tokens: LCS length / reference length).

Aggregates:

- ``forget_quality`` (:func:`forget_quality`): p-value of the two-sample Kolmogorov-Smirnov test between the
  forget-set truth ratios of the unlearned model and of the retain-only model (scipy's ``ks_2samp``, two-sided);
  >= 0.05 means indistinguishable at the 5% level;
- ``model_utility`` (:func:`model_utility`): harmonic mean of the mean answer probability, the mean ROUGE-L
  recall and the truth-ratio score ``mean max(0, 1 - R)`` on retain data (TOFU also averages real-author and
  world-fact sets; the benchmark has only the retain people);
- MIA AUC, forget (member, 1) against holdout people (0): LOSS attack (score = minus the mean answer-token
  NLL) and Min-K% Prob (Shi et al. 2024, arXiv 2310.16789; score = the mean of the lowest k% answer-token
  log-probabilities, k = 20%, at least one token). 0.5: forget people look like people never seen.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.lm.task import CausalLMTask, answer_token_log_probs

MIN_K_FRACTION = 0.2
_WORD = re.compile(r"\w+")


def rouge_l_recall(reference: str, candidate: str) -> float:
    """ROUGE-L recall: longest common subsequence of lower-cased word tokens / number of reference tokens."""
    ref, cand = _WORD.findall(reference.lower()), _WORD.findall(candidate.lower())
    if not ref:
        raise InvalidDataError("reference", "ROUGE-L recall of an empty reference is undefined")
    previous = [0] * (len(cand) + 1)
    for r in ref:
        current = [0]
        for j, c in enumerate(cand):
            current.append(previous[j] + 1 if r == c else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(ref)


@dataclass(frozen=True)
class AnswerStatistics:
    """Per example: summed answer NLL, number of answer tokens, and the Min-K% score."""

    nll: Tensor
    lengths: Tensor
    min_k: Tensor

    @property
    def normalised_probability(self) -> Tensor:
        return torch.exp(-self.nll / self.lengths)


@torch.no_grad()
def answer_statistics(task: CausalLMTask, model: nn.Module, examples: ExampleSet, batch_size: int = 128,
                      min_k_fraction: float = MIN_K_FRACTION) -> AnswerStatistics:
    """Answer-token statistics in eval mode (the model's mode is restored), on the CPU."""
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()
    nll, lengths, min_k = [], [], []
    for batch in examples.batches(batch_size, device):
        log_probs, mask = answer_token_log_probs(task.outputs(model, batch), batch["input_ids"], batch["answer_mask"])
        nll.append(-(log_probs * mask).sum(dim=1).cpu())
        count = mask.sum(dim=1)
        lengths.append(count.cpu())
        masked = torch.where(mask.bool(), log_probs, torch.full_like(log_probs, float("inf")))
        ordered = masked.sort(dim=1).values  # lowest log-probabilities first, padding (inf) last
        for row in range(ordered.shape[0]):
            k = max(1, math.ceil(min_k_fraction * int(count[row])))
            min_k.append(float(ordered[row, :k].mean()))
    model.train(was_training)
    return AnswerStatistics(torch.cat(nll), torch.cat(lengths), torch.tensor(min_k))


def truth_ratios(paraphrase_probability: Tensor, perturbed_probabilities: Tensor) -> Tensor:
    """``R = mean_j P(perturbed_j) / P(paraphrase)`` per question, from length-normalised probabilities.

    paraphrase_probability: [Q]; perturbed_probabilities: [Q, J].
    """
    return perturbed_probabilities.mean(dim=1) / paraphrase_probability.clamp_min(1e-30)


def forget_quality(unlearned_truth_ratios: Tensor | np.ndarray, reference_truth_ratios: Tensor | np.ndarray) -> float:
    """Two-sided two-sample KS-test p-value between forget-set truth ratios (unlearned vs retain-only model)."""
    a, b = np.asarray(unlearned_truth_ratios, dtype=float), np.asarray(reference_truth_ratios, dtype=float)
    if a.size == 0 or b.size == 0:
        raise InvalidDataError("forget", "forget quality needs truth ratios of at least one question")
    return float(ks_2samp(a, b).pvalue)


def truth_ratio_score(ratios: Tensor) -> float:
    """TOFU's truth-ratio score on retain data: mean of max(0, 1 - R) (1 = always prefers the truth)."""
    return float((1.0 - ratios).clamp_min(0.0).mean())


def harmonic_mean(values: list[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def model_utility(answer_probability: float, rouge: float, truth_score: float) -> float:
    return harmonic_mean([answer_probability, rouge, truth_score])


def mia_auc(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """ROC AUC of ``score`` separating members (1) from non-members (0)."""
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    return float(roc_auc_score(labels, np.r_[np.asarray(member_scores), np.asarray(nonmember_scores)]))


@dataclass(frozen=True)
class QASplit:
    """The encoded questions of one group of people: trained-on answers, paraphrases, perturbations."""

    answers: ExampleSet
    paraphrases: ExampleSet
    perturbed: tuple[ExampleSet, ...]
    references: tuple[str, ...]  # the answer texts, for ROUGE-L

    def __len__(self) -> int:
        return len(self.answers)


@dataclass(frozen=True)
class SplitScores:
    rouge: Tensor
    answer_probability: Tensor
    truth_ratio: Tensor
    loss_score: Tensor  # minus the mean answer-token NLL (LOSS attack)
    min_k_score: Tensor
    generations: tuple[str, ...]


def score_split(task: CausalLMTask, model: nn.Module, split: QASplit, max_new_tokens: int = 12) -> SplitScores:
    stats = answer_statistics(task, model, split.answers)
    paraphrase = answer_statistics(task, model, split.paraphrases).normalised_probability
    perturbed = torch.stack([answer_statistics(task, model, p).normalised_probability for p in split.perturbed], dim=1)
    generations = task.generate(model, split.answers, max_new_tokens)
    rouge = torch.tensor([rouge_l_recall(ref, gen) for ref, gen in zip(split.references, generations)])
    return SplitScores(rouge, stats.normalised_probability, truth_ratios(paraphrase, perturbed),
                       -stats.nll / stats.lengths, stats.min_k, tuple(generations))


@dataclass(frozen=True)
class LMMetrics:
    """The benchmark's M for causal LMs (every field a float, so sweeps can average them)."""

    forget_rouge: float
    retain_rouge: float
    holdout_rouge: float
    forget_truth_ratio: float  # mean over forget questions
    forget_answer_probability: float
    model_utility: float
    mia_auc: float  # LOSS attack
    mia_auc_loss: float
    mia_auc_min_k: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def evaluate_lm(task: CausalLMTask, model: nn.Module, forget: QASplit, retain: QASplit,
                holdout: QASplit) -> tuple[LMMetrics, SplitScores]:
    """M for one model, and the forget-split scores (their truth ratios feed :func:`forget_quality`)."""
    f, r, h = (score_split(task, model, split) for split in (forget, retain, holdout))
    loss_auc = mia_auc(f.loss_score, h.loss_score)
    metrics = LMMetrics(
        forget_rouge=float(f.rouge.mean()), retain_rouge=float(r.rouge.mean()), holdout_rouge=float(h.rouge.mean()),
        forget_truth_ratio=float(f.truth_ratio.mean()), forget_answer_probability=float(f.answer_probability.mean()),
        model_utility=model_utility(float(r.answer_probability.mean()), float(r.rouge.mean()),
                                    truth_ratio_score(r.truth_ratio)),
        mia_auc=loss_auc, mia_auc_loss=loss_auc, mia_auc_min_k=mia_auc(f.min_k_score, h.min_k_score))
    return metrics, f
