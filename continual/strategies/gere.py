"""``gere``: General Replay with the threshold-margin loss, for causal LMs (arXiv 2508.04676).

GeRe mixes a fixed set of generic texts into every update and keeps the model's last-layer activations
on them on the same side of per-dimension thresholds as before the update:

1. at the start, run the current model f* on the generic texts (:mod:`continual.generic_text`, generated
   by the project: no person, no record) and take the last-layer hidden states h* of every real token;
   per hidden dimension d, mu_d and sigma_d over those tokens give pos_d = mu_d + sigma_d and
   neg_d = mu_d - sigma_d;
2. an entry (text, token, d) is *high* when h*_d > pos_d, *low* when h*_d < neg_d, free otherwise;
3. per step, with an update batch and a batch of generic texts, the threshold-margin loss on the generic
   batch's current hidden states h is

       margin = sum(relu(pos_d - h) over high entries + relu(h - neg_d) over low entries) / #(high and low entries)

   and  L = (CE_new + CE_generic) / 2 + w * margin,  with w = ``weight`` (100 by default), or with
   ``weight_mode = "dynamic"`` w = ((CE_new + CE_generic) / 2) / margin, detached (the margin term then
   weighs as much as the cross-entropy).

The thresholds are recomputed from the current version at every update, and the generic texts hold no
personal data, so GeRe stores nothing an erasure must purge (CONTINUAL.md). Causal LMs only: the model
must return ``hidden_states`` (``transformers`` models do).

Mutates in place: no (works on a copy).

Differences from the paper: the generic texts are short templated question/answer pairs, not a general
corpus sample (our tiny GPT has no general pre-training, so it also learns them during the first update);
the margin is averaged over the constrained entries (high or low).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from continual.generic_text import MAX_PAIRS, generic_pairs
from continual.registry import CAUSAL_LM, UpdateRequest, UpdateResult, register
from continual.training import (
    copy_for_update,
    decaying_schedule,
    make_update_optimizer,
    model_device,
    seeded,
    task_loss,
    update_batches,
    update_plan,
)
from unlearn.config import require
from unlearn.data import Batch, ExampleSet
from unlearn.lm.task import model_context_length
from unlearn.tasks import eval_mode

NOT_A_PERSON = -1  # subject_id of the generic texts


@dataclass(frozen=True)
class GeReConfig:
    """Hyper-parameters of GeRe (arXiv 2508.04676).

    weight: w, the weight of the threshold-margin loss in ``fixed`` mode. Paper default 100.
    weight_mode: ``fixed`` (w = ``weight``) or ``dynamic`` (w = CE / margin, detached; the paper's option).
    generic_texts: how many generic texts to replay (drawn with the request's seed from
        :mod:`continual.generic_text`). Lethe default 64.
    generic_batch_size: generic texts per step; 0 (default) = the update batch size.
    epochs: passes over the update; 0 (default) = the request's ``update_epochs``.
    lr_scale: multiplies the original recipe's learning rate (default 1).
    """

    weight: float = 100.0
    weight_mode: Literal["fixed", "dynamic"] = "fixed"
    generic_texts: int = 64
    generic_batch_size: int = 0
    epochs: int = 0
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        require(0 <= self.weight <= 1e6, "weight", f"must be in [0, 1e6], got {self.weight}")
        require(self.weight_mode in ("fixed", "dynamic"), "weight_mode", f"must be 'fixed' or 'dynamic', got {self.weight_mode!r}")
        require(1 <= self.generic_texts <= MAX_PAIRS, "generic_texts", f"must be in [1, {MAX_PAIRS}], got {self.generic_texts}")
        require(0 <= self.generic_batch_size <= 65536, "generic_batch_size",
                f"must be in [0, 65536] (0 = the update batch size), got {self.generic_batch_size}")
        require(0 <= self.epochs <= 10_000, "epochs", f"must be in [0, 10000] (0 = the request's), got {self.epochs}")
        require(0 < self.lr_scale <= 100, "lr_scale", f"must be in (0, 100], got {self.lr_scale}")


@dataclass(frozen=True)
class Thresholds:
    """pos = mu + sigma and neg = mu - sigma per hidden dimension, and the high/low masks of h* per entry."""

    pos: Tensor  # [H]
    neg: Tensor  # [H]
    high: Tensor  # [N, L, H] bool
    low: Tensor  # [N, L, H] bool


def last_hidden(model: nn.Module, batch: Batch) -> Tensor:
    """The last layer's hidden states [B, L, H] (after the final norm, as ``transformers`` returns them)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=True).hidden_states[-1]


@torch.no_grad()
def thresholds(model: nn.Module, generic: ExampleSet, batch_size: int = 64) -> Thresholds:
    """GeRe's per-dimension thresholds from ``model`` (the current version) on the generic texts."""
    device = model_device(model)
    with eval_mode(model):
        hidden = torch.cat([last_hidden(model, batch).float().cpu() for batch in generic.batches(batch_size, device)])
    real = generic["attention_mask"].bool()
    tokens = hidden[real]  # [tokens, H]
    mu, sigma = tokens.mean(dim=0), tokens.std(dim=0, unbiased=False)
    pos, neg = mu + sigma, mu - sigma
    high = (hidden > pos) & real.unsqueeze(-1)
    low = (hidden < neg) & real.unsqueeze(-1)
    return Thresholds(pos.to(device), neg.to(device), high, low)


def margin_loss(hidden: Tensor, pos: Tensor, neg: Tensor, high: Tensor, low: Tensor) -> Tensor:
    """Mean over constrained entries of relu(pos - h) (high entries) and relu(h - neg) (low entries)."""
    hinge = torch.relu(pos - hidden) * high + torch.relu(hidden - neg) * low
    return hinge.sum() / (high.sum() + low.sum()).clamp_min(1)


def generic_examples(request: UpdateRequest, model: nn.Module, count: int) -> ExampleSet:
    prompts, answers = zip(*generic_pairs(count, request.seed))
    return request.task.encode(list(prompts), list(answers), [NOT_A_PERSON] * count, model_context_length(model),
                               field="generic_texts")


@register("gere", GeReConfig, tasks=(CAUSAL_LM,))
def gere(model: nn.Module, request: UpdateRequest, config: GeReConfig) -> UpdateResult:
    """General replay of generic texts with GeRe's threshold-margin loss on last-layer activations."""
    task, device = request.task, model_device(model)
    plan = update_plan(request, config.epochs, config.lr_scale)
    generic = generic_examples(request, model, config.generic_texts)
    limits = thresholds(model, generic)  # from the current version, at every update
    generic_batch = config.generic_batch_size or plan.batch_size
    work = copy_for_update(model)
    optimizer = make_update_optimizer(request, work.parameters(), plan.lr)
    schedule = decaying_schedule(optimizer, plan.steps)
    shuffle = torch.Generator().manual_seed(request.seed)
    sampler = torch.Generator().manual_seed(request.seed + 1)
    step, margin_total, weight_total = 0, 0.0, 0.0
    work.train()
    with seeded(request.seed + 2, device):
        for epoch in range(plan.epochs):
            for _, batch in update_batches(request.update, plan.batch_size, shuffle, device):
                index = torch.randperm(len(generic), generator=sampler)[:generic_batch]
                replay = {name: tensor[index].to(device) for name, tensor in generic.tensors.items()}
                new_loss = task.batch_loss(work, batch)
                replay_out = work(input_ids=replay["input_ids"], attention_mask=replay["attention_mask"],
                                  output_hidden_states=True)  # one pass gives the CE and the activations
                generic_loss = task_loss(task, replay_out.logits, replay)
                margin = margin_loss(replay_out.hidden_states[-1].float(), limits.pos, limits.neg,
                                     limits.high[index].to(device), limits.low[index].to(device))
                cross_entropy = (new_loss + generic_loss) / 2
                if config.weight_mode == "dynamic":
                    weight = float(cross_entropy.detach() / margin.detach()) if float(margin) > 0 else 0.0
                else:
                    weight = config.weight
                loss = cross_entropy + weight * margin
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                margin_total += float(margin.detach())
                weight_total += weight
                request.after_step(work, step)
            request.report((epoch + 1) / plan.epochs, f"epoch {epoch + 1}/{plan.epochs}")
    work.eval()
    return UpdateResult(work, details={
        "strategy": "gere", "seed": request.seed, "epochs": plan.epochs, "steps": step, "lr": plan.lr,
        "weight_mode": config.weight_mode, "mean_weight": weight_total / max(step, 1),
        "mean_margin": margin_total / max(step, 1), "generic_texts": len(generic),
        "constrained_fraction": float((limits.high | limits.low).float().mean())})
