"""``flat``: Forget data only Loss AdjustmenT (Wang et al., ICLR 2025, arXiv 2410.11143).

LLM unlearning from the forget data alone: no retain set, no reference model. For each forget prompt x_f
the model should prefer a template answer y_e (a refusal, "I don't know") over the forget answer y_f.
FLAT maximises an f-divergence variational bound between the two, i.e. minimises (paper Eq. 6)

    L(theta) = -g*(P(x_f, y_e; theta)) + f*(g*(P(x_f, y_f; theta)))

averaged over forget examples, where P is the token PROBABILITY (not the log-probability) averaged over
the answer's tokens, g* the divergence's activation and f* its convex conjugate (:data:`DIVERGENCES`):

- KL:      g*(v) = v,                          f*(g*(v)) = exp(v - 1)
- JS:      g*(v) = log 2 - log(1 + exp(-v)),   f*(g*(v)) = v + log(1 + exp(-v)) - log 2
- Pearson: g*(v) = v,                          f*(g*(v)) = v^2 / 4 + v
- TV:      g*(v) = tanh(v) / 2,                f*(g*(v)) = tanh(v) / 2   (the reference code's default)

Template answers: one of :data:`unlearn.lm.people.REFUSAL_TEMPLATES` drawn per forget example with the
request's seed (the released code's Harry Potter path pairs forget answers with random text instead; not
copied). They are tokenised with the task's tokenizer after each example's own prompt.

Loop (one straight function below), as :mod:`unlearn.methods.ga`: shuffled forget mini-batches (each with
its template answers), two forward passes (template, forget), the loss, backward, AdamW step; stopped at
the forgetting target of :mod:`unlearn.forget_target` (forget exact match down to the held-out people's,
the "never seen" level) or after ``epochs`` passes. Gradients in eval mode (no dropout).

Needs a causal-LM task (:class:`unlearn.lm.task.CausalLMTask`): the template answers are text.

Cost: two forward/backward passes over a forget mini-batch per step, plus the check.

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper: P is the mean probability over each example's ANSWER tokens; the reference
implementation averages over every position of the padded batch, which shrinks P by the factor
answer length / padded length and makes it depend on the batch's padding. The learning rate default is
for the benchmark's tiny GPT, not a 7B model; the run stops at the forgetting target by default rather than
after a fixed number of epochs (``stop_at_target=false`` restores the fixed schedule).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from unlearn.data import Batch, ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, DEFAULT_STOP_MIN_P, ForgetTarget
from unlearn.gradients import batch_stream, trainable_parameters
from unlearn.lm.people import REFUSAL_TEMPLATES
from unlearn.lm.task import LM_FIELDS, answer_token_log_probs, model_context_length
from unlearn.registry import (
    UnlearnRequest,
    UnlearnResult,
    copy_model,
    model_device,
    register,
    require,
)

TEMPLATE_PREFIX = "template_"  # the template answer's fields beside the forget answer's in one example set
LOG_2 = math.log(2.0)

# divergence -> (activation g*, conjugate of the activation f*(g*(v))), arXiv 2410.11143 Table 1.
DIVERGENCES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "kl": (lambda v: v, lambda v: torch.exp(v - 1.0)),
    "js": (lambda v: LOG_2 - torch.nn.functional.softplus(-v),
           lambda v: v + torch.nn.functional.softplus(-v) - LOG_2),
    "pearson": (lambda v: v, lambda v: v.pow(2) / 4.0 + v),
    "tv": (lambda v: 0.5 * torch.tanh(v), lambda v: 0.5 * torch.tanh(v)),
}


@dataclass(frozen=True)
class FLATConfig:
    """Hyper-parameters of FLAT (arXiv 2410.11143, Sec. 5 and App.).

    divergence: the f-divergence, one of ``kl``, ``js``, ``pearson``, ``tv``; the reference code's
        default is ``tv`` (paper Table 2 reports KL as best on Harry Potter; all four are offered).
    lr: AdamW learning rate. Paper 1e-5 (7B models: 2e-7); Lethe default 1e-3 for the benchmark's tiny
        GPT (at 1e-5 it does not move in a few epochs).
    weight_decay: AdamW weight decay; paper 0.01.
    epochs: passes over the forget set (upper bound when stopping at the target); paper 5.
        Lethe default 20 (the tiny GPT forgets in about 5-10 at lr 1e-3).
    batch_size: forget mini-batch size. Lethe default 16.
    stop_at_target: stop as soon as the forgetting target is reached (:mod:`unlearn.forget_target`).
    class_forget_target: class erasure is done when forget accuracy <= this (not used by LMs).
    stop_min_p, stop_auc_margin: record erasure is done when the forget set's per-example losses are
        indistinguishable from the never-trained ``tune`` records' (KS p-value >= stop_min_p and loss-attack
        AUC <= 0.5 + stop_auc_margin); the run also stops, with ``target_reached=False``, when it went beyond
        (:mod:`unlearn.forget_target`).
    """

    divergence: Literal["kl", "js", "pearson", "tv"] = "tv"
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 20
    batch_size: int = 16
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN

    def __post_init__(self) -> None:
        require(self.divergence in DIVERGENCES, "divergence",
                f"must be one of {sorted(DIVERGENCES)}, got {self.divergence!r}")
        require(0 < self.lr <= 1.0, "lr", f"must be in (0, 1], got {self.lr}")
        require(0 <= self.weight_decay <= 1.0, "weight_decay", f"must be in [0, 1], got {self.weight_decay}")
        require(1 <= self.epochs <= 10_000, "epochs", f"must be in [1, 10000], got {self.epochs}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")
        require(0 <= self.class_forget_target <= 1, "class_forget_target", "must be in [0, 1]")
        require(0 < self.stop_min_p < 1, "stop_min_p", "must be in (0, 1)")
        require(0 <= self.stop_auc_margin <= 0.5, "stop_auc_margin", "must be in [0, 0.5]")


def mean_answer_token_probability(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """P per example: the mean over its answer tokens of each token's probability (not log-probability)."""
    log_probs, mask = answer_token_log_probs(logits, input_ids, answer_mask)
    return (log_probs.exp() * mask).sum(dim=1) / mask.sum(dim=1)


def flat_loss_from_probabilities(template_probability: Tensor, forget_probability: Tensor, divergence: str) -> Tensor:
    """FLAT's loss ``mean(-g*(P_e) + f*(g*(P_f)))`` (paper Eq. 6) from the per-example probabilities."""
    activation, conjugate = DIVERGENCES[divergence]
    return (-activation(template_probability) + conjugate(forget_probability)).mean()


def flat_loss(task, model: nn.Module, batch: Batch, divergence: str) -> Tensor:
    """FLAT's loss on a forget mini-batch that carries its template answers (see :func:`with_templates`)."""
    template = {name: batch[TEMPLATE_PREFIX + name] for name in LM_FIELDS}
    template_p = mean_answer_token_probability(task.outputs(model, template), template["input_ids"],
                                               template["answer_mask"])
    forget_p = mean_answer_token_probability(task.outputs(model, batch), batch["input_ids"], batch["answer_mask"])
    return flat_loss_from_probabilities(template_p, forget_p, divergence)


def with_templates(task, model: nn.Module, forget: ExampleSet, seed: int) -> ExampleSet:
    """``forget`` plus, per example, the same prompt followed by one refusal drawn with ``seed``."""
    if not hasattr(task, "replace_answers"):
        raise InvalidDataError("task", f"flat needs a causal-LM task with a tokenizer, got {task.name!r}")
    rng = random.Random(seed)
    answers = [" " + rng.choice(REFUSAL_TEMPLATES) for _ in range(len(forget))]
    templates = task.replace_answers(forget, answers, model_context_length(model))
    return ExampleSet({**forget.tensors, **{TEMPLATE_PREFIX + n: templates[n] for n in LM_FIELDS}})


@register("flat", FLATConfig, needs_retain=False, tasks=("causal_lm",))
def flat(model: nn.Module, request: UnlearnRequest, config: FLATConfig) -> UnlearnResult:
    """FLAT: prefer refusal templates over the forget answers, from the forget data alone."""
    task, forget = request.task, request.forget
    paired = with_templates(task, model, forget, request.seed)  # validates before any weight is touched
    work = copy_model(model)
    work.eval()  # no dropout; gradients as in the paper's fine-tuning otherwise
    target = (ForgetTarget(task, request.tune, request.forget_classes, config.class_forget_target,
                           config.stop_min_p, config.stop_auc_margin, "flat")
              if config.stop_at_target else None)
    params = trainable_parameters(work)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = batch_stream(paired, config.batch_size, model_device(work), torch.Generator().manual_seed(request.seed))
    max_steps = config.epochs * forget.num_batches(config.batch_size)

    steps, check = 0, None
    while True:
        if config.stop_at_target:
            check = target.check(work, forget)
            if target.done(check):
                break
        if steps >= max_steps:
            break
        loss = flat_loss(task, work, next(batches), config.divergence)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        request.report(steps / max_steps, f"step {steps}: FLAT loss {loss.item():.4f}")

    work.zero_grad(set_to_none=True)
    details = {"steps": steps, "epochs": steps / forget.num_batches(config.batch_size),
               "divergence": config.divergence, "lr": config.lr}
    if check is not None:
        details.update(check.details())
    return UnlearnResult(work, details=details, target_reached=None if check is None else check.reached)
