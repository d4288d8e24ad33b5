"""``replay``: experience replay and DER++ (Buzzega et al., NeurIPS 2020, arXiv 2004.07211), deletion-aware.

Per step, with (x, y) an update batch and two independent batches drawn from the replay buffer B
(:class:`~continual.buffer.ReplayBuffer`: records x', x'', labels y'', logits z' stored when x' entered B):

    L = CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')        (paper Eq. 6)

``alpha = 0`` is experience replay (ER); ``beta = 0`` is DER. During the last pass over the update, each
update batch enters B by reservoir sampling after its step, with the logits f(x) of that step's forward
pass (the paper's z: "logits at insertion time"). ``stored_logits = "current"`` matches instead the logits
the model the update starts from gives the buffered records, recomputed at the start of every update (a
distillation of the current version on the buffer, as iCaRL's; on class-incremental digits it learned the
new classes better, docs/results/continual.md). For causal LMs the MSE compares logits at the
answer-predicting positions and the CE is the answer tokens' (the adapter's training objective).

Deletion: the strategy reads the caller's buffer, never changes it, and returns the buffer to persist
(``UpdateResult.buffer``). Erased rows must have been purged (:meth:`ReplayBuffer.purge`) before; a buffer
still holding an erased record or subject is refused before any training. A purged buffer's remaining
logits were computed by a model that had seen the erased data, so they are recomputed with the model the
update starts from (the current post-erasure version) before training (``details["logits_refreshed"]``).

Mutates in place: no (works on copies of the model and the buffer).

Differences from the paper: one forward pass over the update batch and both buffer batches together (the
reference makes three; batch-norm statistics are then those of the union, and the step costs less); the
update's records are offered to the reservoir during the LAST pass over them only (the paper inserts during
every pass, and in its multi-epoch settings the later insertions win too), so the same record is never
offered twice and its stored logits come from a model that has learned it; a purge refreshes the remaining
logits (the paper has no deletion); the ``current`` option above. Inputs are not augmented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from continual.examples import pad_width, stack_batches
from continual.losses import logit_mse, output_rows
from continual.registry import CAUSAL_LM, CLASSIFICATION, UpdateRequest, UpdateResult, register
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


@dataclass(frozen=True)
class ReplayConfig:
    """Hyper-parameters of DER++ / ER (arXiv 2004.07211, Sec. 3-4).

    alpha: weight of the logit-matching term, paper symbol alpha. Reference default 0.3 (seq-CIFAR-100,
        buffer 500, CONTINUAL.md); 0 gives experience replay (ER).
    beta: weight of the replayed cross-entropy, paper symbol beta. Reference default 0.5; 0 gives DER.
    buffer_batch_size: size of each buffer batch (x' and x''); 0 (default) = the update batch size, as the
        reference's ``minibatch_size``.
    stored_logits: which logits z' the alpha term matches. ``insertion`` (paper, default): those stored when
        the record entered the buffer (recomputed only after a purge). ``current``: recomputed from the model
        the update starts from at every update, so the term distils the current version on the buffer
        (iCaRL-style); no stored logit then ever predates the current version.
    epochs: passes over the update; 0 (default) = the request's ``update_epochs``.
    lr_scale: multiplies the original recipe's learning rate (default 1).
    """

    alpha: float = 0.3
    beta: float = 0.5
    buffer_batch_size: int = 0
    stored_logits: Literal["insertion", "current"] = "insertion"
    epochs: int = 0
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        require(0 <= self.alpha <= 100, "alpha", f"must be in [0, 100], got {self.alpha}")
        require(0 <= self.beta <= 100, "beta", f"must be in [0, 100], got {self.beta}")
        require(0 <= self.buffer_batch_size <= 65536, "buffer_batch_size",
                f"must be in [0, 65536] (0 = the update batch size), got {self.buffer_batch_size}")
        require(self.stored_logits in ("insertion", "current"), "stored_logits",
                f"must be 'insertion' or 'current', got {self.stored_logits!r}")
        require(0 <= self.epochs <= 10_000, "epochs", f"must be in [0, 10000] (0 = the request's), got {self.epochs}")
        require(0 < self.lr_scale <= 100, "lr_scale", f"must be in (0, 100], got {self.lr_scale}")


@register("replay", ReplayConfig, tasks=(CLASSIFICATION, CAUSAL_LM), stores="buffer")
def replay(model: nn.Module, request: UpdateRequest, config: ReplayConfig) -> UpdateResult:
    """Experience replay / DER++ from a purge-aware buffer with stored logits."""
    task, device = request.task, model_device(model)
    buffer = request.require_buffer("replay").copy()
    refreshed = buffer.logits_stale or config.stored_logits == "current"
    if refreshed:  # stale logits predate the latest erasure; "current" asks for the current version's anyway
        buffer.refresh_logits(task, model)
    plan = update_plan(request, config.epochs, config.lr_scale)
    buffer_batch = config.buffer_batch_size or plan.batch_size
    work = copy_for_update(model)
    optimizer = make_update_optimizer(request, work.parameters(), plan.lr)
    schedule = decaying_schedule(optimizer, plan.steps)
    shuffle = torch.Generator().manual_seed(request.seed)
    sampler = torch.Generator().manual_seed(request.seed + 1)
    rows_before, step, inserted = len(buffer), 0, 0
    totals = {"new": 0.0, "logit_mse": 0.0, "replay_ce": 0.0}
    work.train()
    with seeded(request.seed + 2, device):
        for epoch in range(plan.epochs):
            for index, batch in update_batches(request.update, plan.batch_size, shuffle, device):
                parts = [batch]
                if len(buffer) and config.alpha > 0:  # x', z' for alpha * ||z' - f(x')||^2
                    logit_rows, stored = buffer.sample(buffer_batch, sampler, device)
                    parts.append(logit_rows)
                if len(buffer) and config.beta > 0:  # x'', y'' for beta * CE(f(x''), y'')
                    label_rows, _ = buffer.sample(buffer_batch, sampler, device)
                    parts.append(label_rows)
                combined, parts = stack_batches(parts)  # one forward pass over the three batches
                outputs = list(task.outputs(work, combined).split([len(next(iter(p.values()))) for p in parts]))
                new_outputs, batch = outputs.pop(0), parts.pop(0)
                new_loss = task_loss(task, new_outputs, batch)
                loss = new_loss
                if len(buffer) and config.alpha > 0:
                    rows = parts.pop(0)
                    stored = pad_width(stored, outputs[0].shape[1]) if stored.dim() == 3 else stored
                    mse = logit_mse(output_rows(outputs.pop(0), rows), output_rows(stored, rows))
                    loss = loss + config.alpha * mse
                    totals["logit_mse"] += float(mse.detach())
                if len(buffer) and config.beta > 0:
                    replay_ce = task_loss(task, outputs.pop(0), parts.pop(0))
                    loss = loss + config.beta * replay_ce
                    totals["replay_ce"] += float(replay_ce.detach())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                totals["new"] += float(new_loss.detach())
                if epoch == plan.epochs - 1:  # offer the update's rows once, with this step's logits
                    rows_index, offered = index.tolist(), request.update.subset(index)
                    logits = new_outputs.detach()
                    if logits.dim() == 3:  # causal LM: back to the update's own width (padding was for stacking)
                        logits = logits[:, : offered["input_ids"].shape[1]]
                    inserted += buffer.offer(offered, logits,
                                             [request.update_record_ids[i] for i in rows_index],
                                             [request.update_subject_hashes[i] for i in rows_index])
                request.after_step(work, step)
            request.report((epoch + 1) / plan.epochs, f"epoch {epoch + 1}/{plan.epochs}")
    work.eval()
    variant = "er" if config.alpha == 0 else ("der" if config.beta == 0 else "der++")
    details = {"strategy": "replay", "variant": variant, "seed": request.seed, "epochs": plan.epochs, "steps": step,
               "lr": plan.lr, "batch_size": plan.batch_size, "buffer_batch_size": buffer_batch,
               "alpha": config.alpha, "beta": config.beta, "stored_logits": config.stored_logits,
               "buffer_rows_before": rows_before,
               "buffer_rows_after": len(buffer), "buffer_rows_written": inserted, "logits_refreshed": refreshed,
               **{f"mean_{name}_loss": value / max(step, 1) for name, value in totals.items()}}
    return UpdateResult(work, details=details, buffer=buffer)
