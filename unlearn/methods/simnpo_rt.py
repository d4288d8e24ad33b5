"""``simnpo+rt``: SimNPO with its retain term (Fan et al., 2024, arXiv 2410.07163, the paper's full objective).

Objective (minimised), per step on the forget set and one retain mini-batch:

    L(theta) = (2 / beta) * E_Df[ softplus( delta - beta * l_theta(y|x) / |y| ) ]  +  lambda * E_Dr[ l_theta(y|x) / |y| ]

The first term is :mod:`unlearn.methods.simnpo`'s (``l_theta`` the answer NLL summed over its tokens, ``|y|``
its token count); the second is the NLL of retained answers per answer token (``task.batch_loss``), the
regulariser of the paper's Eq. 4 ("SimNPO + lambda * retain loss", the form the paper evaluates on TOFU).

Why this module for causal LMs (issue 9, docs/results/lm.md): the forget term is gradient ascent on each
forget answer's mean token NLL, weighted by ``2 * sigmoid(delta - beta * nll/|y|)``; with ``delta / beta``
above the never-seen people's NLL level the weight stays near 2 until an answer gets there and then fades,
so answers already forgotten stop being pushed while the others catch up, and the retain term repairs the
retained people's answers, which share frames, values and names with the forget people's. The run stops at
the never-seen level of :mod:`unlearn.forget_target` (forget answer NLLs indistinguishable from the ``tune``
people's).

Loop (one straight function below): each step takes a forget mini-batch (``batch_size``; the default covers
a subject's whole forget set) and the next retain mini-batch (``retain_batch_size``, a seeded reshuffling
stream), forwards both, backward, Adam step. The forgetting target is checked before the first step and
then every ``check_every`` steps, and once more on the returned weights when the budget runs out: a check
forwards the forget set and every ``tune`` record, which on the benchmark's tiny GPT costs as much as ten
optimiser steps, so checking every step would cost more than the unlearning itself.

Cost per step: one forward/backward pass over a forget mini-batch and one over a retain mini-batch; plus a
check (forward over Df and the tune records) every ``check_every`` steps. No reference model.

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper: stopped at the never-seen level of the ``tune`` records instead of after a
fixed number of epochs (``stop_at_target=false`` restores the fixed schedule of ``max_steps``); the retain
loss is per answer token over the retain batch (``task.batch_loss``); the defaults are for the benchmark's
tiny GPT (paper: beta 2.5-4.5, delta 0-2, lambda 0.1-0.2, lr 1e-5 on 7B models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import math
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from unlearn.data import ExampleSet
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, DEFAULT_STOP_MIN_P, ForgetCheck, ForgetTarget
from unlearn.membership import membership_losses, membership_test
from unlearn.tasks import accuracy
from unlearn.gradients import batch_stream, make_unlearning_optimizer, trainable_parameters
from unlearn.methods.simnpo import simnpo_loss
from unlearn.registry import (
    UnlearnRequest,
    UnlearnResult,
    copy_model,
    model_device,
    register,
    require,
)


@dataclass(frozen=True)
class SimNPORTConfig:
    """Hyper-parameters of SimNPO with its retain term (arXiv 2410.07163, Eq. 4).

    beta: inverse temperature, paper symbol beta; paper default 4.5 (TOFU 2.5).
    delta: reward margin, paper symbol gamma; paper 0. The forget weight ``2 sigmoid(delta - beta nll/|y|)``
        halves where an answer's mean token NLL reaches ``delta / beta`` and vanishes beyond. None (Lethe
        default) = ``beta`` times the ``fade_quantile`` quantile of the ``tune`` records' mean token NLLs on
        the model before the first step: the push fades where never-seen answers' NLLs thin out, so answers
        already at the never-seen level are not pushed past it while the others catch up. (The paper's 0 fades
        at NLL 0, before a memorised answer is anywhere near the never-seen level.)
    fade_quantile: quantile of the tune NLLs that sets ``delta`` when ``delta`` is None. Lethe default 0.8
        (the benchmark GPT: ~3 nats per token; a fixed delta of 13.5 = 4.5 * 3 measured best there).
    retain_weight: weight of the retain NLL, paper symbol lambda (TOFU: 0.1375 in the paper's grid).
    lr: Adam learning rate (paper 1e-5 on 7B models).
    optimizer: ``adam`` (torch defaults) or ``sgd`` (plain).
    batch_size: forget mini-batch size.
    retain_batch_size: retain mini-batch size; each batch is drawn without replacement with the weights of
        :func:`neighbour_weights`.
    neighbour_weight: how much more often retained examples that share rare tokens (names, values) with the
        forget set are drawn (0 = uniformly, the paper). Not in the paper.
    max_steps: optimiser-step budget; a run that ends it without reaching the target reports
        ``target_reached=False``.
    check_every: check the forgetting target every this many steps (1 = before every step).
    tune_refresh_every: recompute the tune records' losses every this many checks (and before any verdict
        that stops the run); in between, checks reuse them (:class:`NeverSeenCheck`).
    stop_at_target: stop at the never-seen level (:mod:`unlearn.forget_target`).
    class_forget_target: class erasure is done when forget accuracy <= this.
    stop_min_p, stop_auc_margin: record erasure is done when the forget set's per-example losses are
        indistinguishable from the ``tune`` records' (KS p-value >= stop_min_p and loss-attack AUC <= 0.5 +
        stop_auc_margin); the run also stops, with ``target_reached=False``, when it went beyond.
    """

    beta: float = 4.5
    delta: float | None = None
    fade_quantile: float = 0.8
    retain_weight: float = 1.0
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 64
    retain_batch_size: int = 64
    neighbour_weight: float = 0.0
    max_steps: int = 200
    check_every: int = 1
    tune_refresh_every: int = 5
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN

    def __post_init__(self) -> None:
        require(0 < self.beta <= 100, "beta", f"must be in (0, 100], got {self.beta}")
        require(self.delta is None or -100 <= self.delta <= 100, "delta",
                f"must be in [-100, 100] or null (from the tune records), got {self.delta}")
        require(0 < self.fade_quantile < 1, "fade_quantile", f"must be in (0, 1), got {self.fade_quantile}")
        require(0 <= self.retain_weight <= 1000, "retain_weight", f"must be in [0, 1000], got {self.retain_weight}")
        require(0 < self.lr <= 1.0, "lr", f"must be in (0, 1], got {self.lr}")
        require(self.optimizer in ("adam", "sgd"), "optimizer", f"must be 'adam' or 'sgd', got {self.optimizer!r}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")
        require(1 <= self.retain_batch_size <= 65536, "retain_batch_size",
                f"must be in [1, 65536], got {self.retain_batch_size}")
        require(1 <= self.max_steps <= 10**6, "max_steps", f"must be in [1, 1e6], got {self.max_steps}")
        require(1 <= self.check_every <= 10**6, "check_every", f"must be in [1, 1e6], got {self.check_every}")
        require(0 <= self.neighbour_weight <= 1000, "neighbour_weight",
                f"must be in [0, 1000], got {self.neighbour_weight}")
        require(1 <= self.tune_refresh_every <= 10**6, "tune_refresh_every",
                f"must be in [1, 1e6], got {self.tune_refresh_every}")
        require(0 <= self.class_forget_target <= 1, "class_forget_target", "must be in [0, 1]")
        require(0 < self.stop_min_p < 1, "stop_min_p", "must be in (0, 1)")
        require(0 <= self.stop_auc_margin <= 0.5, "stop_auc_margin", "must be in [0, 0.5]")


def neighbour_weights(forget: ExampleSet, retain: ExampleSet, strength: float) -> Tensor:
    """Sampling weight of each retained example: ``1 + strength * score / mean score``.

    ``score`` = the summed inverse document frequency (over the retained examples) of the tokens an example
    shares with the forget set, prompt and answer: shared names and values count, the template words every
    question has count ~0. Interference concentrates there: on the benchmark, 63% of the retained answers a
    GradDiff run broke shared a value with a forget answer, against 27% of all retained answers.
    """
    if strength == 0:
        return torch.ones(len(retain))

    def token_sets(examples: ExampleSet) -> list[set[int]]:
        return [set(ids[mask.bool()].tolist()) for ids, mask in zip(examples["input_ids"], examples["attention_mask"])]

    retained = token_sets(retain)
    forget_tokens = set().union(*token_sets(forget))
    frequency: dict[int, int] = {}
    for tokens in retained:
        for token in tokens:
            frequency[token] = frequency.get(token, 0) + 1
    idf = {token: math.log(len(retained) / count) for token, count in frequency.items()}
    score = torch.tensor([sum(idf[t] for t in tokens & forget_tokens) for tokens in retained], dtype=torch.float64)
    mean = float(score.mean())
    return 1.0 + strength * score / mean if mean > 0 else torch.ones(len(retain), dtype=torch.float64)


class NeverSeenCheck:
    """The stop rule of :mod:`unlearn.forget_target` with the tune records' losses cached between checks.

    A check forwards the forget set only and tests it against the cached tune losses; the tune losses are
    recomputed on the current weights every ``refresh_every`` checks and before any verdict that would stop
    the run, so the run never stops on a stale reference. (Tune losses drift slowly while the forget set is
    unlearned: the benchmark's never-seen people moved from 2.12 to ~2.25 nats per token over a run.)
    """

    def __init__(self, target: ForgetTarget, task, tune: ExampleSet, refresh_every: int):
        self.target, self.task, self.tune, self.refresh_every = target, task, tune, refresh_every
        self.tune_losses: np.ndarray | None = None
        self.checks = self.refreshes = 0

    def __call__(self, model: nn.Module, forget: ExampleSet) -> ForgetCheck:
        fresh = self.tune_losses is None or self.checks % self.refresh_every == 0
        self.checks += 1
        check = self._decide(model, forget, refresh=fresh)
        if self.target.done(check) and not fresh:
            check = self._decide(model, forget, refresh=True)
        return check

    def _decide(self, model: nn.Module, forget: ExampleSet, refresh: bool) -> ForgetCheck:
        if refresh:
            self.tune_losses, self.refreshes = membership_losses(self.task, model, self.tune), self.refreshes + 1
        membership = membership_test(membership_losses(self.task, model, forget), self.tune_losses)
        return self.target.decide(membership, math.nan)  # forget accuracy: measured once, on the result


@register("simnpo+rt", SimNPORTConfig, needs_retain=True)
def simnpo_rt(model: nn.Module, request: UnlearnRequest, config: SimNPORTConfig) -> UnlearnResult:
    """SimNPO on the forget set plus lambda times the retain NLL, stopped at the never-seen level."""
    task, forget = request.task, request.forget
    retain = request.require_retain("simnpo+rt")
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    target = (ForgetTarget(task, request.tune, request.forget_classes, config.class_forget_target,
                           config.stop_min_p, config.stop_auc_margin, "simnpo+rt")
              if config.stop_at_target else None)
    if target is None:
        stop = None
    elif request.forget_classes:  # class erasure: the accuracy target, no tune losses to cache
        stop = target.check
    else:
        stop = NeverSeenCheck(target, task, request.tune, config.tune_refresh_every)
    if config.delta is not None:
        delta = config.delta
    else:  # beta times a quantile of the never-seen (tune) answers' NLLs, on the weights before any step
        tune = request.require_tune("simnpo+rt (delta from the tune records; or set delta)")
        delta = config.beta * float(np.quantile(membership_losses(task, work, tune), config.fade_quantile))
    params = trainable_parameters(work)
    optimizer = make_unlearning_optimizer(config.optimizer, params, config.lr)
    device = model_device(work)
    forget_batches = batch_stream(forget, config.batch_size, device, torch.Generator().manual_seed(request.seed))
    retain_weights = neighbour_weights(forget, retain, config.neighbour_weight)
    retain_draws = torch.Generator().manual_seed(request.seed + 1)

    steps, check, checks = 0, None, 0
    while True:
        if stop is not None and (steps % config.check_every == 0 or steps >= config.max_steps):
            check, checks = stop(work, forget), checks + 1
            if target.done(check):
                break
        if steps >= config.max_steps:
            break
        retain_index = torch.multinomial(retain_weights, min(config.retain_batch_size, len(retain)),
                                         replacement=False, generator=retain_draws)
        retain_batch = {name: t[retain_index].to(device) for name, t in retain.tensors.items()}
        forget_loss = simnpo_loss(task, work, next(forget_batches), config.beta, delta)
        retain_loss = task.batch_loss(work, retain_batch)
        optimizer.zero_grad(set_to_none=True)
        (forget_loss + config.retain_weight * retain_loss).backward()
        optimizer.step()
        steps += 1
        request.report(steps / config.max_steps, f"step {steps}: SimNPO term {forget_loss.item():.4f}, "
                                                 f"retain NLL {retain_loss.item():.4f}")

    work.zero_grad(set_to_none=True)
    details = {"steps": steps, "checks": checks, "epochs": steps / forget.num_batches(config.batch_size),
               "beta": config.beta, "delta": delta, "retain_weight": config.retain_weight,
               "neighbour_weight": config.neighbour_weight, "lr": config.lr, "optimizer": config.optimizer,
               "check_every": config.check_every}
    if isinstance(stop, NeverSeenCheck):
        details["tune_refreshes"] = stop.refreshes
    if check is None:
        return UnlearnResult(work, details=details, message=f"{steps} step(s) without a target check")
    check = replace(check, forget_acc=accuracy(task, work, forget))
    details.update(check.details())
    if check.reached:
        message = f"never-seen level reached after {steps} step(s)"
    elif check.over:
        message = f"went beyond the never-seen level after {steps} step(s) (over-forgetting)"
    else:
        message = f"step budget of {config.max_steps} exhausted before the never-seen level"
    return UnlearnResult(work, details=details, target_reached=check.reached, message=message)
