"""Pieces shared by ``gslora`` and ``gslora++`` (no method is registered here).

GS-LoRA (Zhao et al., CVPR 2024, arXiv 2403.11530) and GS-LoRA++ ("Practical Continual Forgetting for
Pre-trained Vision Models", arXiv 2501.09705): METHODS.md, "GS-LoRA / GS-LoRA++".

- Loss pieces as pure functions: :func:`group_sparse_penalty` (L_s), :func:`bounded_forget_loss` (L_f),
  :func:`prototype_divergence`, :func:`forget_prototype_loss` and :func:`retain_prototype_loss`.
- LoRA through ``peft``: :func:`attach_ffn_lora` puts rank-r LoRA on both FFN linears of every transformer
  block (attention, head, norms and biases stay frozen), :func:`lora_groups` gives one group per block, and
  :func:`merge_lora` folds ``W += B A * scale`` into the base weights and returns a plain module.
- The continual-task contract, :func:`task_data` (see below), few-shot sampling and class prototypes.

Continual contract (issue 6). Consecutive forgetting tasks are consecutive calls, each on the previous
call's returned model, with:

- ``request.forget``: this task's records; the classes among its labels are this task's classes;
- ``request.forget_classes``: EVERY class erased so far from this model lineage, i.e. the earlier tasks'
  classes plus this task's (the result must predict none of them, which is also what the retrain
  reference, the evaluation and ``ssd-auto``'s utility check expect from this field). Each call returns
  the union in ``details["forgotten_classes"]``: the caller adds the next task's classes to it and passes
  it as the next request's ``forget_classes``;
- ``request.retain``: retain data. Records of any class in ``forget_classes`` are DROPPED before training
  (counted in ``details["retain_dropped"]``), so an earlier-forgotten class never re-enters the retain loss
  even when a caller passes the full remaining training set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.data import Batch, ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.registry import UnlearnRequest

if TYPE_CHECKING:  # peft (and transformers behind it) takes seconds to import: loaded on first use only
    from peft import PeftModel

# FFN linears of a transformer block: transformers >= 5 ViT (``layers.N.mlp.fc1/fc2``), timm-style blocks
# (``blocks.N.mlp.fc1/fc2``) and transformers 4 ViT (``layer.N.intermediate.dense`` / ``layer.N.output.dense``;
# ``attention.output.dense`` is attention and stays untouched).
_FFN_NAME = re.compile(r"^(?P<block>.*\.(?:layers?|blocks)\.\d+)\.(?:mlp\.fc[12]|intermediate\.dense|output\.dense)$")


# --------------------------------------------------------------------------------------------------------
# Loss pieces (pure functions)
# --------------------------------------------------------------------------------------------------------

def group_sparse_penalty(groups: Sequence[Sequence[Tensor]]) -> Tensor:
    """L_s = sum over groups g of sqrt(sum_{W in g} ||W||_F^2) (GS-LoRA Eq. 4; a group = one block's LoRA).

    ``vector_norm`` of the concatenation equals that square root and has a defined (zero) subgradient at
    an all-zero group, where ``sqrt(sum of squares)`` would give NaN gradients.
    """
    if not groups or any(len(group) == 0 for group in groups):
        raise InvalidDataError("groups", "group sparsity needs at least one non-empty group")
    norms = [torch.linalg.vector_norm(torch.cat([w.reshape(-1) for w in group])) for group in groups]
    return torch.stack(norms).sum()


def bounded_forget_loss(forget_ce: Tensor, bound: float) -> Tensor:
    """L_f = ReLU(BND - CE(forget batch)): ascent on the forget loss that stops once it reaches BND.

    ``forget_ce`` is the batch-mean cross-entropy, as in the paper (a bound on the mean, not per example).
    Never plain ascent: unbounded ascent drives CE to infinity and wrecks the retained classes.
    """
    return F.relu(bound - forget_ce)


def prototype_divergence(prototypes: Tensor, embeddings: Tensor) -> Tensor:
    """Per-example KL(softmax(P[y]) || softmax(emb(x))) over the feature dimension, no temperature.

    ``prototypes`` holds P[y] row by row for the batch (the same shape as ``embeddings``, [batch, d]).
    """
    if prototypes.shape != embeddings.shape or prototypes.dim() != 2:
        raise InvalidDataError("embeddings", f"prototypes {tuple(prototypes.shape)} and embeddings "
                               f"{tuple(embeddings.shape)} must both be [batch, d]")
    target_log = F.log_softmax(prototypes, dim=1)
    return (target_log.exp() * (target_log - F.log_softmax(embeddings, dim=1))).sum(dim=1)


def forget_prototype_loss(prototypes: Tensor, embeddings: Tensor, bound: float) -> Tensor:
    """GS-LoRA++ forget side: ReLU(BND_pro - mean KL): push forgotten classes away from their prototypes."""
    return F.relu(bound - prototype_divergence(prototypes, embeddings).mean())


def retain_prototype_loss(prototypes: Tensor, embeddings: Tensor) -> Tensor:
    """GS-LoRA++ retain side: mean KL: keep retained classes at their (pre-task) prototypes."""
    return prototype_divergence(prototypes, embeddings).mean()


# --------------------------------------------------------------------------------------------------------
# LoRA on the FFN linears (peft)
# --------------------------------------------------------------------------------------------------------

def ffn_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Block prefix -> qualified names of its FFN ``nn.Linear`` modules, in model order.

    Raises :class:`InvalidDataError` (field ``model``) when the model has no recognisable transformer FFN.
    """
    blocks: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        match = _FFN_NAME.match(name)
        if match and isinstance(module, nn.Linear) and ".attention." not in name:
            blocks.setdefault(match["block"], []).append(name)
    if not blocks or any(len(names) != 2 for names in blocks.values()):
        raise InvalidDataError("model", "GS-LoRA needs a vision transformer whose blocks each have two FFN "
                               "linears (mlp.fc1/fc2 or intermediate/output.dense)")
    return blocks


def vision_transformer_check(model: nn.Module) -> str | None:
    """The registry's ``model_check`` for GS-LoRA: None on a transformer with FFN blocks, else why not."""
    try:
        ffn_blocks(model)
    except InvalidDataError as error:
        return error.reason
    return None


def attach_ffn_lora(model: nn.Module, rank: int, lora_alpha: float, seed: int) -> PeftModel:
    """Wrap ``model`` IN PLACE with peft LoRA on every block's two FFN linears; only LoRA is trainable.

    peft's default init: A kaiming-uniform, B = 0, so the wrapped model starts equal to ``model``. The A
    init is drawn under ``seed`` (without disturbing the caller's RNG). ``bias="none"``: biases, norms, the
    head and attention are frozen.
    """
    from peft import LoraConfig, get_peft_model

    targets = [name for names in ffn_blocks(model).values() for name in names]
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_groups(peft_model: PeftModel) -> dict[str, list[Tensor]]:
    """Block prefix -> that block's LoRA matrices (A and B of fc1 and fc2): the groups of L_s."""
    groups: dict[str, list[Tensor]] = {}
    for name, parameter in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        module = name.split(".lora_")[0]
        match = _FFN_NAME.match(module)
        if match is None:
            raise InvalidDataError("model", f"LoRA parameter {name} is not on a block's FFN")
        groups.setdefault(match["block"], []).append(parameter)
    return groups


@torch.no_grad()
def lora_block_report(peft_model: PeftModel, base_weights: dict[str, Tensor], threshold: float) -> dict:
    """Per block: the LoRA group norm and the merged update's relative size ||B A s||_F / ||W||_F.

    A block counts as changed ("non-zero") when its largest relative update exceeds ``threshold``: the A
    matrices start from a kaiming init, so the group norm itself never reaches zero unless the penalty
    shrinks A too; the update B A is what touches the model.
    """
    group_norms = {block: float(group_sparse_penalty([params])) for block, params in lora_groups(peft_model).items()}
    relative: dict[str, float] = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            block = _FFN_NAME.match(name.removeprefix("base_model.model."))["block"]
            delta = module.get_delta_weight("default")
            size = float(delta.norm() / base_weights[name.removeprefix("base_model.model.")].norm())
            relative[block] = max(relative.get(block, 0.0), size)
    active = [block for block, size in relative.items() if size > threshold]
    return {"group_norms": group_norms, "relative_update": relative, "active_blocks": len(active),
            "blocks": len(relative)}


def merge_lora(peft_model: PeftModel, flags: dict[str, bool]) -> nn.Module:
    """Fold every LoRA update into its base weight (W += B A * scale) and return the plain module.

    No peft wrapper or LoRA layer is left, so the result exports to ONNX like the original; each parameter
    gets back its ``requires_grad`` flag from ``flags`` (name -> flag, taken before the LoRA was attached: peft
    freezes the base weights, the returned model keeps the flags it was registered with), and it is in eval mode.
    """
    merged = peft_model.merge_and_unload()
    for name, parameter in merged.named_parameters():
        parameter.requires_grad_(flags[name])
    return merged.eval()


def trainable_share(peft_model: PeftModel, base_parameters: int) -> tuple[int, float]:
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return trainable, trainable / base_parameters


# --------------------------------------------------------------------------------------------------------
# Task data: the continual contract, few-shot sampling, prototypes, batches
# --------------------------------------------------------------------------------------------------------

def task_data(request: UnlearnRequest, method: str, shots_per_class: int) -> tuple[ExampleSet, ExampleSet, dict]:
    """This task's forget and retain sets under the continual contract (module docstring).

    Returns (forget, retain, facts). Retain records of every class in ``request.forget_classes`` are
    dropped; with ``shots_per_class`` > 0 both sets are cut to k records per class (few-shot mode), drawn
    with ``request.seed``.
    """
    if request.forget_classes is None or len(request.forget_classes) == 0:
        raise InvalidDataError("forget_classes", f"method {method!r} erases whole classes: set forget_classes "
                               "to every class erased so far (earlier tasks' and this task's)")
    retain = request.require_retain(method)
    erased = torch.tensor(sorted({int(c) for c in request.forget_classes}), dtype=torch.long)
    forget_labels = request.forget["labels"]
    task_classes = sorted(int(c) for c in torch.unique(forget_labels))
    stray = sorted(set(task_classes) - set(erased.tolist()))
    if stray:
        raise InvalidDataError("forget_classes", f"the forget set holds classes {stray} that are not in "
                               f"forget_classes {erased.tolist()}")
    keep = ~torch.isin(retain["labels"], erased)
    dropped = int((~keep).sum())
    retain = retain.subset(torch.nonzero(keep).flatten())
    if len(retain) == 0:
        raise InvalidDataError("retain", "no retain record is left once every erased class is excluded")
    forget = request.forget
    if shots_per_class > 0:
        generator = torch.Generator().manual_seed(request.seed)
        forget = few_shot(forget, shots_per_class, generator)
        retain = few_shot(retain, shots_per_class, generator)
    facts = {"task_classes": task_classes, "forgotten_classes": erased.tolist(),
             "earlier_classes": sorted(set(erased.tolist()) - set(task_classes)),
             "retain_dropped": dropped, "forget_records": len(forget), "retain_records": len(retain),
             "shots_per_class": shots_per_class or None}
    return forget, retain, facts


def few_shot(examples: ExampleSet, shots: int, generator: torch.Generator) -> ExampleSet:
    """At most ``shots`` records per class, drawn at random; classes keep their order of appearance."""
    labels = examples["labels"]
    chosen = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return examples.subset(torch.sort(torch.cat(chosen)).values)


@torch.no_grad()
def class_prototypes(embed, examples: ExampleSet, num_classes: int, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """P[c] = mean embedding of class c over ``examples`` (rows of absent classes are 0), and a presence mask.

    ``embed`` maps an input batch to [batch, d] features; call it with the model BEFORE the task, in eval mode.
    """
    sums, counts = None, torch.zeros(num_classes)
    for batch in examples.batches(batch_size):
        features = embed(batch["inputs"]).float().cpu()
        if sums is None:
            sums = torch.zeros(num_classes, features.shape[1])
        sums.index_add_(0, batch["labels"], features)
        counts.index_add_(0, batch["labels"], torch.ones(len(batch["labels"])))
    present = counts > 0
    return sums / counts.clamp(min=1).unsqueeze(1), present


def endless_batches(examples: ExampleSet, batch_size: int, generator: torch.Generator,
                    device: torch.device) -> Iterator[Batch]:
    """Shuffled mini-batches, epoch after epoch (a new permutation each pass), forever."""
    while True:
        yield from examples.batches(min(batch_size, len(examples)), device, shuffle_generator=generator)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """The reference's cosine schedule without restarts: base_lr * (1 + cos(pi * step / total)) / 2."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
