"""TOFU-style evaluation of a causal LM, computed as the reference code computes it (issue 9, item 9).

The TOFU paper (Maini et al. 2024, arXiv 2401.06121) and its two reference codebases disagree in places;
Lethe follows the CODE, which is what every published number was produced with. The files each function
is aligned with are cited in its docstring:

- TOFU: ``locuslab/tofu``, ``aggregate_eval_stat.py`` (truth ratio, forget quality, model utility) and
  ``evaluate_util.py`` (``eval_rouge_recall``);
- OpenUnlearning: ``locuslab/open-unlearning``, ``src/evals/metrics/memorization.py`` (``truth_ratio``,
  ``probability``, ``rouge``), ``src/evals/metrics/utils.py`` (``evaluate_probability``,
  ``tokenwise_logprobs``, ``eval_text_similarity``), ``src/evals/metrics/privacy.py`` (``ks_test``),
  ``src/evals/metrics/utility.py`` (``hm_aggregate``), ``src/evals/metrics/mia/{loss,min_k,utils}.py`` and
  ``configs/eval/tofu_metrics/mia_min_k.yaml`` (k = 0.4).

Per question, from :func:`answer_statistics` (answer tokens only, prompt masked, end-of-sequence included
unless said otherwise):

- answer probability ``exp(-mean answer-token NLL)`` (:attr:`AnswerStatistics.normalised_probability`);
- truth ratio ``R`` (:func:`truth_ratios`): the GEOMETRIC mean of the perturbed answers' normalised
  probabilities over the paraphrase's; below 1 when the model prefers the true fact in a wording it was not
  trained on, about 1 for a person it never saw;
- ROUGE-L recall of the greedy answer against the reference answer (:func:`rouge_l_recall`, the
  ``rouge-score`` package with its Porter stemmer).

Aggregates:

- ``forget_quality`` (:func:`forget_quality`): two-sided two-sample KS-test p-value between the forget-set
  truth ratios of the unlearned model and of the model trained without the forget set;
- ``forget_truth_ratio`` (:func:`truth_ratio_closeness`): the forget-set statistic the field reports,
  ``mean(min(R, 1/R))`` (1 = true and wrong answers equally likely);
- ``model_utility`` (:func:`model_utility`): harmonic mean of the mean answer probability, the mean ROUGE-L
  recall and the truth-ratio score ``mean max(0, 1 - R)`` on the retained people (TOFU's nine numbers also
  cover real-author and world-fact sets, which a model trained from scratch on invented people cannot have:
  three of the nine here);
- membership (:func:`evaluate_lm`): the LOSS attack (per-question mean answer NLL, end token included: the
  statistic :mod:`unlearn.membership` and the verification gate use) and Min-K% Prob (:func:`min_k_scores`,
  end token dropped, k = 0.4), each as an AUC of the forget people (members) against the ``audit`` people
  (never seen, never used by a method): 0.5 = indistinguishable, 1 = still known, 0 = over-forgotten.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from rouge_score import rouge_scorer
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.lm.task import CausalLMTask
from unlearn.membership import MembershipResult, knowledge_probe, membership_test
from unlearn.tasks import eval_mode

MIN_K_FRACTION = 0.4
"""k of Min-K% Prob for TOFU in OpenUnlearning (``configs/eval/tofu_metrics/mia_min_k.yaml``: ``k: 0.4``)."""


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(reference: str, candidate: str) -> float:
    """ROUGE-L recall of ``candidate`` against ``reference``, as both reference codebases compute it.

    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, candidate)``'s
    recall: lower-cased alphanumeric tokens, Porter-stemmed (tokens longer than 3 characters), longest common
    subsequence / number of reference tokens. TOFU: ``evaluate_util.py``, ``eval_rouge_recall`` (``scorer.score(gt,
    gen)``); OpenUnlearning: ``src/evals/metrics/utils.py``, ``eval_text_similarity``, which strips both texts
    first (done here too; it changes nothing for the tokenizer but says what is compared). A reference with
    no alphanumeric token scores 0, as in the package.
    """
    return float(_rouge_l_scorer().score(reference.strip(), candidate.strip())["rougeL"].recall)


def min_k_scores(log_probs: Tensor, answer_mask: Tensor, k: float = MIN_K_FRACTION) -> Tensor:
    """Min-K% Prob per example (Shi et al. 2024, arXiv 2310.16789): the mean of its k lowest token log-probs.

    ``log_probs`` [B, T]: each position's log-probability of the next token; ``answer_mask`` [B, T]: 1 on the
    answer targets, the closing end-of-sequence token being the LAST 1 of each row (as
    :func:`unlearn.lm.task.answer_token_log_probs` returns them). As OpenUnlearning
    (``src/evals/metrics/utils.py``, ``tokenwise_logprobs``: the labelled positions ``[:-1]``, "to ignore eos
    prediction"; ``src/evals/metrics/mia/min_k.py``: ``max(1, int(len(lp) * k))``):

    - the end-of-sequence target is dropped, leaving the n answer tokens proper;
    - the count is ``max(1, floor(k * n))``.

    Sign: the mean log-probability itself (higher = more likely a member). OpenUnlearning returns minus it
    and labels the forget set 0 (``src/evals/metrics/mia/utils.py``, ``mia_auc``); the AUC is the same.
    """
    if not 0 < k <= 1:
        raise InvalidDataError("k", f"Min-K% needs k in (0, 1], got {k}")
    scores = []
    for row, mask in zip(log_probs, answer_mask.bool()):
        positions = mask.nonzero().flatten()[:-1]  # the last answer target is the end-of-sequence token
        if positions.numel() == 0:
            raise InvalidDataError("answer", "Min-K% needs at least one answer token before the end token")
        values = row[positions].sort().values  # lowest log-probabilities first
        count = max(1, math.floor(k * positions.numel()))
        scores.append(values[:count].mean())
    return torch.stack(scores)


@dataclass(frozen=True)
class AnswerStatistics:
    """Per example: summed answer NLL (end token included), number of answer tokens, and the Min-K% score."""

    nll: Tensor
    lengths: Tensor
    min_k: Tensor

    @property
    def mean_nll(self) -> Tensor:
        """Mean answer-token NLL, OpenUnlearning's ``avg_loss`` (``evaluate_probability``): the LOSS attack's
        statistic and the per-example loss of :mod:`unlearn.membership`."""
        return self.nll / self.lengths

    @property
    def normalised_probability(self) -> Tensor:
        """``exp(-mean NLL)``, TOFU's and OpenUnlearning's answer probability (``probability``)."""
        return torch.exp(-self.mean_nll)


@torch.no_grad()
def answer_statistics(task: CausalLMTask, model: nn.Module, examples: ExampleSet, batch_size: int = 128,
                      min_k_fraction: float = MIN_K_FRACTION) -> AnswerStatistics:
    """Answer-token statistics in eval mode (the model's mode is restored), on the CPU, in float64."""
    device = next(iter(model.parameters())).device
    nll, lengths, min_k = [], [], []
    with eval_mode(model):
        for batch in examples.batches(batch_size, device):
            log_probs, mask = task.answer_log_probs(model, batch)
            log_probs, mask = log_probs.double().cpu(), mask.double().cpu()
            nll.append(-(log_probs * mask).sum(dim=1))
            lengths.append(mask.sum(dim=1))
            min_k.append(min_k_scores(log_probs, mask, min_k_fraction))
    return AnswerStatistics(torch.cat(nll), torch.cat(lengths), torch.cat(min_k))


def truth_ratios(paraphrase_probability: Tensor, perturbed_probabilities: Tensor) -> Tensor:
    """Truth ratio per question: ``R = (prod_j P(perturbed_j))^(1/J) / P(paraphrase)``, from normalised probabilities.

    paraphrase_probability: [Q]; perturbed_probabilities: [Q, J].

    The GEOMETRIC mean over the J perturbed answers, computed as the mean of their mean-token NLLs, is what
    both reference codebases do: TOFU ``aggregate_eval_stat.py`` (``np.exp(perturbed_loss.mean(-1) -
    paraphrased_loss)``, the reciprocal of R, see :func:`forget_quality`) and OpenUnlearning
    ``src/evals/metrics/memorization.py``, ``truth_ratio`` (``aggregate_to_1D`` of the wrong answers'
    ``avg_loss``, then ``exp(-.)``, over ``exp(-correct avg_loss)``). The TOFU paper writes an arithmetic mean
    of the probabilities; that form is >= the geometric one (AM-GM) and was never used for a published number,
    so it is not offered.
    """
    log_perturbed = torch.log(perturbed_probabilities.double())
    log_paraphrase = torch.log(paraphrase_probability.double())
    return torch.exp(log_perturbed.mean(dim=1) - log_paraphrase)


def truth_ratio_closeness(ratios: Tensor) -> float:
    """The forget-set truth-ratio statistic the field reports: ``mean(min(R, 1/R))`` (1 = no preference).

    TOFU ``aggregate_eval_stat.py`` (``np.mean(np.minimum(stat, 1/stat))`` on the forget log, symmetric in R and
    1/R); OpenUnlearning ``src/evals/metrics/memorization.py``, ``closer_to_1_better`` (``configs/eval/
    tofu_metrics/forget_Truth_Ratio.yaml``). A model that still knows the facts has R << 1 (statistic near 0);
    so has one that learned to reject them (R >> 1): the statistic cannot tell the two apart, the KS test of
    :func:`forget_quality` on the R distribution can.
    """
    ratios = ratios.double()
    return float(torch.minimum(ratios, 1.0 / ratios).mean())


def forget_quality(unlearned_truth_ratios: Tensor | np.ndarray, reference_truth_ratios: Tensor | np.ndarray) -> float:
    """Two-sided two-sample KS-test p-value between forget-set truth ratios (unlearned vs retain-only model).

    ``scipy.stats.ks_2samp`` with its defaults, as TOFU ``aggregate_eval_stat.py`` (``get_forget_quality``, on
    1/R) and OpenUnlearning ``src/evals/metrics/privacy.py`` (``ks_test``, on R; ``utils.get_forget_quality``
    on 1/R): the KS statistic depends on ranks only, so R and 1/R give the same p-value.
    """
    a, b = np.asarray(unlearned_truth_ratios, dtype=float), np.asarray(reference_truth_ratios, dtype=float)
    if a.size == 0 or b.size == 0:
        raise InvalidDataError("forget", "forget quality needs truth ratios of at least one question")
    return float(ks_2samp(a, b).pvalue)


def truth_ratio_score(ratios: Tensor) -> float:
    """TOFU's truth-ratio score on retained data: ``mean max(0, 1 - R)`` (1 = always prefers the truth).

    TOFU ``aggregate_eval_stat.py`` (``np.maximum(0, 1 - 1/stat)`` with ``stat = 1/R``); OpenUnlearning
    ``src/evals/metrics/memorization.py``, ``true_better``.
    """
    return float((1.0 - ratios.double()).clamp_min(0.0).mean())


def harmonic_mean(values: list[float]) -> float:
    """``scipy.stats.hmean`` as both codebases aggregate model utility (0 when any value is 0)."""
    if any(v < 0 for v in values):
        raise InvalidDataError("utility", f"the harmonic mean needs non-negative values, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def model_utility(answer_probability: float, rouge: float, truth_score: float) -> float:
    """Harmonic mean of answer probability, ROUGE-L recall and truth-ratio score (TOFU ``get_model_utility``,
    OpenUnlearning ``hm_aggregate``), here on the retained people only."""
    return harmonic_mean([answer_probability, rouge, truth_score])


def mia_auc(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """ROC AUC of ``score`` separating members (1) from non-members (0); higher score = more likely a member."""
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
    mean_nll: Tensor  # per question: the LOSS attack's statistic (lower = more likely a member)
    min_k_score: Tensor
    generations: tuple[str, ...]


def split_truth_ratios(task: CausalLMTask, model: nn.Module, split: QASplit) -> Tensor:
    """The truth ratio of every question of ``split`` on ``model`` (no generation)."""
    paraphrase = answer_statistics(task, model, split.paraphrases).normalised_probability
    perturbed = torch.stack([answer_statistics(task, model, p).normalised_probability for p in split.perturbed], dim=1)
    return truth_ratios(paraphrase, perturbed)


@dataclass(frozen=True)
class ParaphraseProbe:
    """The gate's ``knowledge`` probe (:class:`unlearn.gate.KnowledgeProbe`) on data with paraphrased and
    perturbed answers: the truth ratios of the erased people's questions and of the audit people's, on a model."""

    task: CausalLMTask
    erased: QASplit
    audit: QASplit

    def ratios(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return (split_truth_ratios(self.task, model, self.erased).numpy(),
                split_truth_ratios(self.task, model, self.audit).numpy())


def score_split(task: CausalLMTask, model: nn.Module, split: QASplit, max_new_tokens: int = 12) -> SplitScores:
    stats = answer_statistics(task, model, split.answers)
    generations = task.generate(model, split.answers, max_new_tokens)
    rouge = torch.tensor([rouge_l_recall(ref, gen) for ref, gen in zip(split.references, generations)])
    return SplitScores(rouge, stats.normalised_probability, split_truth_ratios(task, model, split), stats.mean_nll,
                       stats.min_k, tuple(generations))


@dataclass(frozen=True)
class LMMetrics:
    """The benchmark's M for causal LMs (every field a float, so sweeps can average them).

    ``mia_auc`` is the LOSS attack's AUC of the forget people against the ``audit`` people (issue 9), the
    same number as the gate's ``membership_auc``; ``mia_ks_p`` the KS p-value of the same two loss samples.
    """

    forget_rouge: float
    retain_rouge: float
    audit_rouge: float
    forget_truth_ratio: float  # mean(min(R, 1/R)) over forget questions
    forget_answer_probability: float
    forget_mean_nll: float
    audit_mean_nll: float
    model_utility: float
    mia_auc: float  # LOSS attack, forget vs audit
    mia_auc_loss: float
    mia_auc_min_k: float
    mia_ks_p: float
    knowledge_ks_p: float  # :func:`knowledge_probe`, forget vs audit people's truth ratios on this model
    knowledge_log_shift: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


LM_METRIC_SPLITS = {
    "forget_rouge": "forget people (trained, erased)",
    "retain_rouge": "retain people (trained, kept)",
    "audit_rouge": "audit people (never trained, never seen by the method)",
    "forget_truth_ratio": "forget people",
    "forget_answer_probability": "forget people",
    "forget_mean_nll": "forget people",
    "audit_mean_nll": "audit people",
    "model_utility": "retain people (answer probability, ROUGE-L, truth ratio)",
    "mia_auc": "loss attack, forget vs audit people",
    "mia_auc_loss": "loss attack, forget vs audit people",
    "mia_auc_min_k": "Min-K% attack, forget vs audit people",
    "mia_ks_p": "KS test of answer NLLs, forget vs audit people",
    "knowledge_ks_p": "truth ratios, forget vs audit people",
    "knowledge_log_shift": "truth ratios, forget vs audit people",
    "forget_quality": "forget people's truth ratios, this model vs the in-process retrain",
    "gate": "utility on the retain people; membership and knowledge, forget vs audit people",
}
"""Where each number of the LM benchmark's JSON comes from (its ``splits``). No metric reads a tune person."""


def evaluate_lm(task: CausalLMTask, model: nn.Module, forget: QASplit, retain: QASplit,
                audit: QASplit) -> tuple[LMMetrics, SplitScores, MembershipResult]:
    """M for one model, the forget-split scores (their truth ratios feed :func:`forget_quality`) and the
    membership test of the forget people against the audit people (:func:`unlearn.membership.membership_test`)."""
    f, r, a = (score_split(task, model, split) for split in (forget, retain, audit))
    membership = membership_test(f.mean_nll.numpy(), a.mean_nll.numpy())
    metrics = LMMetrics(
        forget_rouge=float(f.rouge.mean()), retain_rouge=float(r.rouge.mean()), audit_rouge=float(a.rouge.mean()),
        forget_truth_ratio=truth_ratio_closeness(f.truth_ratio),
        forget_answer_probability=float(f.answer_probability.mean()),
        forget_mean_nll=float(f.mean_nll.mean()), audit_mean_nll=float(a.mean_nll.mean()),
        model_utility=model_utility(float(r.answer_probability.mean()), float(r.rouge.mean()),
                                    truth_ratio_score(r.truth_ratio)),
        mia_auc=membership.auc, mia_auc_loss=membership.auc, mia_auc_min_k=mia_auc(f.min_k_score, a.min_k_score),
        mia_ks_p=membership.ks_p_value,
        **dict(zip(("knowledge_ks_p", "knowledge_log_shift"), knowledge_probe(f.truth_ratio, a.truth_ratio))))
    return metrics, f, membership
