"""``unseen-kd``: make the model answer the erased people's questions as it answers people it never saw.

Lethe's method for causal LMs, after the "generic predictions" of Eldan & Russinovich (2023, "Who's Harry
Potter?", arXiv 2310.02238): there, the text to forget is rewritten with its anchored terms (names, places)
replaced by generic counterparts, and the model is fine-tuned towards what it predicts on the rewritten text.
Here the generic counterparts come from the ``tune`` records, which the model never trained on:

1. Neighbours. For each forget record ``(x_f, y_f)``, the ``neighbours`` tune prompts most similar to ``x_f``
   (``difflib`` ratio on token ids: on templated records, the same question about another person) among those
   that share none of the erased subject's name tokens (:func:`nearest_prompts`; the model's answer for a
   never-seen "Corin Bramwell" leans on what it learnt about the erased "Corin Lockridge"); among equally
   similar ones, drawn for each record by a keyed hash (:func:`tie_rank`), so the neighbours are a sample of
   never-seen people and not one person for every record of a question kind.
2. Targets. The ORIGINAL model's next-token distributions over ``y_f``'s tokens after the neighbour's prompt:
   what it predicts for this answer when it does not know the person. At the positions where that
   distribution gives ``y_f``'s own token less than ``swap_below`` (the fact, not the frame around it), and at
   the first position where ``y_f`` and the neighbour's answer differ (the value's start, even where the model
   guesses the erased value for the neighbour), the probabilities of ``y_f``'s token and of the neighbour's own
   answer token are swapped (:func:`swap_uncertain`): the erased value gets the probability the model gives a
   never-seen person's TRUE value, and its log is that position's ``ceiling``. Averaged over the neighbours
   (default 1: an average of peaked distributions is flatter than any one of them and makes the erased answers
   look known).
3. Minimised with Adam, its learning rate warmed up linearly over the first ``warmup_steps``, per step on the
   forget set and one retain mini-batch:

       L(theta) = (1 / |T_f|) * sum_{t in T_f} KL( q(. | x_f, y_f,<t) || p_theta(. | x_f, y_f,<t) )
                  + mu * (1 / |B_f|) * sum_{t in T_f} max(0, log p_theta(y_t | x_f, y_f,<t) - ceiling_t)
                  + lambda * NLL_Dr

   ``T_f`` the answer tokens of the forget batch ``B_f``; ``NLL_Dr`` the retain batch's NLL per answer token.
   The hinge (``ceiling_weight`` = mu) brings the erased token's log-probability down to its ceiling and no
   further; the KL alone moves it too slowly once it is small (its gradient on that logit is ``p - q``).
4. The run stops at the never-seen level of :mod:`unlearn.forget_target` (forget answer NLLs indistinguishable
   from the tune records', and not predicted whole more often: :class:`unlearn.methods.simnpo_rt.NeverSeenCheck`,
   the same rule as ``simnpo+rt``), or reports ``target_reached=False`` when the step budget ends or the run
   stalls (the forget losses passed the KS test ``stall_steps`` steps ago and the AUC bound or the accuracy
   condition has not followed: :meth:`unlearn.methods.simnpo_rt.NeverSeenCheck.stalled`).

Why (docs/results/lm.md, "Never-seen answers as the target: `unseen-kd`"): ascent on the forget answers' NLL
(NPO, SimNPO) has no gradient on answers the model is certain of (the gradient of ``-log p`` with respect to
the logits is ``p - 1``): on the customer-records family 5 to 11 of 50 answers stayed recited while the others
went far beyond the never-seen level, and the default chain shipped an approximate model on 3 of 10 seeds.
Ascent pushes the true answer down but not the rest of the distribution, so the truth ratio (true against
wrong values under another wording) stayed on the truth's side. The targets here move every value's
probability at once, towards the level of a true value the model never saw, and the hinge has its gradient
where the model is most certain. What each step of the construction fixed (customers seed 0, the erased
answers' first-token NLL under the targets against never-seen people's own answers, 8.8 nats): nearest
prompts averaged over 4 neighbours, 0.45 nats per token overall against 1.45 for never-seen answers; excluding
the name tokens and one neighbour, 1.15; the own token removed from the targets, 100 steps still left it at
5.9 nats; the swap and the hinge, the target reached in 12 steps.

Defaults: ``retain_weight`` 50 and the rest chosen on seeds 0-1 of both LM families (gate on the audit people,
raw ``docs/bench_lm_unseen_kd_tuning_2026-11-30.jsonl``): at 1 the retained answers collapsed (retained exact
match 0.11-0.57 after, about 0.97 before), at 20 the gate's utility check failed 4 of 4, at 50 it passed 4 of 4
(as did 20 with ``ceiling_weight`` 0.3; the one-parameter change was kept). Then judged on seeds 2-9 of both
families without further change (docs/results/lm.md). The tie draw, the swap at the value's first position and
``warmup_steps`` 5 (2026-12-02) were measured on seeds 0-4 of both families, alone and together, against the
code before them on the same originals (docs/results/lm.md, "Neighbours drawn among equals, the value's first
token swapped and a warm-up"): the first attempt passed the gate on 10 of 10 instead of 5 of 10.

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper (WHP): no reinforced model and no ``v_baseline - alpha * ReLU(v_reinforced -
v_baseline)`` logits; no dictionary of anchored terms written by another LM: the generic counterpart of a
prompt is the nearest never-trained prompt that does not share the subject's name tokens, so the method needs
``tune`` records shaped like the forget records (on free text with no such neighbours it still runs, and the
gate judges the result); the value swap and the hinge above (WHP's targets are the generic logits' argmax, hard
labels); soft targets (a KL over the whole distribution); a retain NLL term; the stop rule above instead of a
fixed number of steps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.gradients import make_unlearning_optimizer, trainable_parameters
from unlearn.lm.task import concat_batches, model_context_length
from unlearn.methods.simnpo_rt import NeverSeenCheck, require_stop_rule
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, model_device, register, require
from unlearn.training import lr_multiplier


@dataclass(frozen=True)
class UnseenKDConfig:
    """Hyper-parameters of ``unseen-kd`` (Lethe's; the module docstring says where each default comes from).

    neighbours: how many tune prompts (the most similar to each forget prompt) give its targets, averaged.
    swap_below: an answer position whose target gives the record's own token less than this is a fact
        position: its probability is swapped with the neighbour's own token's, and it gets a ceiling.
    ceiling_weight: weight mu of the hinge on the fact positions' log-probabilities above their ceilings.
    retain_weight: weight lambda of the retain NLL.
    lr: Adam learning rate.
    warmup_steps: the learning rate rises linearly to ``lr`` over the first this many optimiser steps
        (``lr * k / warmup_steps`` at step k; 0 or 1: ``lr`` from the first step). Why: Adam's first updates move
        every weight with any gradient by about ``lr``, whatever the gradient's size (its second-moment estimate
        is one squared gradient); on the LM benchmark those first steps broke retained answers that later steps
        had to repair, and the paraphrase probe still found one erased set (docs/results/lm.md, "Neighbours
        drawn among equals, the value's first token swapped and a warm-up"; Liu et al. 2020, RAdam, on the
        variance of Adam's early steps).
    optimizer: ``adam`` (torch defaults) or ``sgd`` (plain).
    batch_size: forget mini-batch size (records drawn without replacement each step when the forget set is
        larger; otherwise the whole forget set every step, whose pass also gives the stop check its losses).
    retain_batch_size: retain mini-batch size.
    max_steps: optimiser-step budget; a run that ends it without reaching the target says so
        (``target_reached=False``).
    check_every, tune_refresh_every, stop_at_target, stop_min_p, stop_auc_margin, stop_accuracy_p: the stop
        rule, as in :class:`unlearn.methods.simnpo_rt.SimNPORTConfig`. ``tune_refresh_every`` 10 here (5 there):
        a stop and the stall count's start are decided on fresh tune losses whatever it is; on biographies
        seeds 0-4 10 stopped at the same steps as 5 on four seeds (50 against 48 on the fifth) with two to
        three fewer passes over the 280 tune answers (docs/results/lm.md, "Threads, and the stop check's cost").
    stall_steps: stop (``target_reached=False``, said in the message) when the forget losses first passed the
        KS test this many steps ago and the rest of the target has not followed; None runs to ``max_steps``
        (:meth:`unlearn.methods.simnpo_rt.NeverSeenCheck.stalled` says where 40 comes from).
    screen: 0 (the default) takes each record's nearest tune prompts as they come. ``k`` >= 1 looks at its ``k``
        nearest and keeps those whose model guess at the first answer position where the neighbour's own answer
        differs is not the erased token (its probability below ``swap_below``), nearest first; the nearest ones
        when none is (:func:`screened`). The default chain's last approximate attempt uses 4 (:mod:`unlearn.chain`).
    """

    neighbours: int = 1
    swap_below: float = 0.5
    ceiling_weight: float = 1.0
    retain_weight: float = 50.0
    lr: float = 1e-3
    warmup_steps: int = 5
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 64
    retain_batch_size: int = 128
    max_steps: int = 200
    check_every: int = 1
    tune_refresh_every: int = 10
    stop_at_target: bool = True
    stop_min_p: float = 0.1
    stop_auc_margin: float = 0.02
    stop_accuracy_p: float | None = 0.1
    stall_steps: int | None = 40
    screen: int = 0

    def __post_init__(self) -> None:
        require(1 <= self.neighbours <= 1024, "neighbours", f"must be in [1, 1024], got {self.neighbours}")
        require(0 <= self.screen <= 1024, "screen", f"must be in [0, 1024], got {self.screen}")
        require(0 <= self.swap_below <= 1, "swap_below", f"must be in [0, 1], got {self.swap_below}")
        require(0 <= self.ceiling_weight <= 1000, "ceiling_weight", f"must be in [0, 1000], got {self.ceiling_weight}")
        require(0 <= self.retain_weight <= 1000, "retain_weight", f"must be in [0, 1000], got {self.retain_weight}")
        require(0 < self.lr <= 1.0, "lr", f"must be in (0, 1], got {self.lr}")
        require(0 <= self.warmup_steps <= 10000, "warmup_steps", f"must be in [0, 10000], got {self.warmup_steps}")
        require(self.optimizer in ("adam", "sgd"), "optimizer", f"must be 'adam' or 'sgd', got {self.optimizer!r}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")
        require(1 <= self.retain_batch_size <= 65536, "retain_batch_size",
                f"must be in [1, 65536], got {self.retain_batch_size}")
        require_stop_rule(self)


def subject_tokens(prompts: list[list[int]], subjects: list[int], candidates: list[list[int]],
                   max_share: float) -> dict[int, set[int]]:
    """Per subject, the tokens in every one of its prompts that few candidate prompts use (its name, on
    templated records): in at most ``max_share`` of the candidates. A subject with one prompt gets that prompt's
    rare tokens."""
    share: dict[int, int] = {}
    for candidate in candidates:
        for token in set(candidate):
            share[token] = share.get(token, 0) + 1
    limit = max_share * len(candidates)
    common: dict[int, set[int]] = {}
    for prompt, subject in zip(prompts, subjects):
        tokens = set(prompt)
        common[subject] = tokens if subject not in common else common[subject] & tokens
    return {subject: {t for t in tokens if share.get(t, 0) <= limit} for subject, tokens in common.items()}


def nearest_prompts(prompts: list[list[int]], subjects: list[int], candidates: list[list[int]], count: int,
                    max_share: float = 0.2) -> list[list[int]]:
    """For each prompt, the indices of the ``count`` most similar candidates (difflib ratio on token ids; ties
    broken by :func:`tie_rank`) among those that share none of its subject's tokens (:func:`subject_tokens`).

    Why the exclusion: the most similar never-trained prompt is the same question about someone whose name
    shares a part with the erased person's, and the model's answer for that name leans on what it learnt about
    the erased person (on the customers benchmark, seed 0, the erased answers' NLL under such targets was a
    median 0.69 nats per token against 1.45 for never-seen people's own answers). If every candidate shares a
    subject token, the most similar ones are used regardless.

    Why ties are not broken in candidate order: on templated records every never-seen person's question of the
    same kind is equally similar (biographies seed 1: 20 or 21 of the 21 tune "In which city was ... born?"
    prompts at ratio 0.846 to each forget one), so candidate order gave one neighbour to many forget records
    (the same tune person for all five erased cities). The model guesses that person's true city (0.59), so
    all five targets predicted their erased city whole, and 8 of 50 targets their erased answer, against 5% of
    never-seen people's answers. :func:`tie_rank` draws among the tied candidates independently for each
    prompt, so the neighbours are a sample of never-seen people, as the targets assume.

    The ranking is exact but skips work: ``quick_ratio`` bounds ``ratio`` from above, so candidates are visited
    in falling bound order and the search ends when no bound left can reach the ``count``-th best ratio (ties
    included, for the tie break). Each candidate's matcher is built once (difflib caches the
    second sequence), which is the same ``SequenceMatcher(None, prompt, candidate)`` comparison.
    """
    names = subject_tokens(prompts, subjects, candidates, max_share)
    matchers = []
    for candidate in candidates:
        matcher = SequenceMatcher(None, autojunk=False)
        matcher.set_seq2(candidate)
        matchers.append(matcher)
    result = []
    for prompt, subject in zip(prompts, subjects):
        avoid = names[subject]
        allowed = [index for index, candidate in enumerate(candidates) if not avoid.intersection(candidate)]
        pool = allowed or list(range(len(candidates)))
        bounds = {}
        for index in pool:
            matchers[index].set_seq1(prompt)
            bounds[index] = matchers[index].quick_ratio()
        best: list[tuple[float, bytes, int]] = []  # (-ratio, tie rank, index), the count best so far, sorted
        for index in sorted(pool, key=lambda i: (-bounds[i], i)):
            if len(best) == count and bounds[index] < -best[-1][0]:
                break  # no candidate left can reach the count-th best ratio
            entry = (-matchers[index].ratio(), tie_rank(prompt, candidates[index]), index)
            best = sorted([*best, entry])[:count]
        result.append([index for _, _, index in best])
    return result


def tie_rank(prompt: list[int], candidate: list[int]) -> bytes:
    """A pseudo-random rank of ``candidate`` for ``prompt``, the same on every run and machine and independent of
    where the candidate stands among the others: a keyed hash of both token sequences (BLAKE2b)."""
    text = ",".join(map(str, prompt)) + "|" + ",".join(map(str, candidate))
    return hashlib.blake2b(text.encode(), digest_size=8, key=b"lethe-unseen-kd-neighbours").digest()


def answer_rows(examples: ExampleSet) -> list[list[int]]:
    """Each example's answer tokens (the end token included), as trained on."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(examples["input_ids"], examples["answer_mask"])]


@dataclass
class UnseenTargets:
    """Per forget record: ``probs`` [answer tokens, V], the distributions to distil, and ``ceiling`` [answer
    tokens], the log-probability its own answer token may keep (0 where the position is not uncertain)."""

    probs: list[Tensor]
    ceiling: list[Tensor]


@torch.no_grad()
def unseen_targets(task, model: nn.Module, forget: ExampleSet, tune: ExampleSet, neighbours: int,
                   swap_below: float, batch_size: int = 256, screen: int = 0) -> UnseenTargets:
    """Per forget record, the model's next-token distributions over its answer after its nearest tune prompts.

    At the answer positions where such a distribution gives the record's own token less than ``swap_below``
    (the fact, not the frame), the probabilities of the record's token and of the neighbour's own answer token
    at that position are swapped: the erased value gets what the model gives a never-seen person's TRUE value,
    and the ceiling is its log. The distributions are averaged over the neighbours.
    """
    distinct: dict[tuple[int, ...], list[int]] = {}
    for prompt, answer in zip(task.prompt_ids(tune), answer_rows(tune)):
        distinct.setdefault(tuple(prompt), answer)
    candidates = [list(prompt) for prompt in distinct]
    candidate_answers = list(distinct.values())
    nearest = nearest_prompts(task.prompt_ids(forget), forget["subject_id"].tolist(), candidates,
                              max(neighbours, screen))
    context = model_context_length(model)
    answers = answer_rows(forget)
    sequences, owners = [], []
    for row, (answer, chosen) in enumerate(zip(answers, nearest)):
        for index in chosen:
            prompt = candidates[index]
            if len(prompt) + len(answer) > context:
                continue  # this neighbour cannot carry the answer; the others still can
            sequences.append((prompt + answer, len(prompt)))
            owners.append((row, index))
    if not sequences:
        raise InvalidDataError("tune", "no tune prompt fits a forget answer in the model's context")
    swapped = task.pack(sequences, torch.zeros(len(sequences), dtype=torch.long))
    device = model_device(model)
    guesses: list[list[tuple[int, Tensor]]] = [[] for _ in range(len(forget))]  # per record, nearest first
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(sequences), batch_size):
            batch = {name: t[start:start + batch_size].to(device) for name, t in swapped.tensors.items()}
            probs = F.softmax(task.answer_logits(model, batch)[0].float(), dim=-1)
            lengths = batch["answer_mask"][:, 1:].sum(dim=1).tolist()
            for offset, part in enumerate(torch.split(probs, lengths)):
                row, index = owners[start + offset]
                guesses[row].append((index, part))
    finally:
        model.train(was_training)
    missing = [row for row, options in enumerate(guesses) if not options]
    if missing:
        raise InvalidDataError("forget", f"{len(missing)} forget record(s) have no tune prompt short enough to "
                               "carry their answer in the model's context")
    probs = []
    for answer, options in zip(answers, guesses):
        if screen:
            options = screened(options, answer, candidate_answers, swap_below)
        parts = [swap_uncertain(part, answer, candidate_answers[index], swap_below)
                 for index, part in options[:neighbours]]
        probs.append(sum(parts[1:], parts[0]) / len(parts))  # nearest first, the order the sum always had
    ceiling = []
    for target, answer in zip(probs, answers):
        own = target[torch.arange(len(answer)), torch.tensor(answer, device=target.device)]
        ceiling.append(torch.where(own < swap_below, own.clamp_min(1e-30).log(), torch.zeros_like(own)))
    return UnseenTargets(probs, ceiling)


def screened(options: list[tuple[int, Tensor]], answer: list[int], candidate_answers: list[list[int]],
             below: float) -> list[tuple[int, Tensor]]:
    """``options`` (candidate index, the model's distributions over ``answer``'s positions after that candidate's
    prompt), nearest first, without those whose guess is the erased value: the ones where, at the first position
    at which the candidate's own answer differs from ``answer``, ``answer``'s token gets ``below`` or more
    (a candidate whose answer does not differ stays). All of ``options`` when every one guesses it.

    Why: on a few records the nearest never-seen person's question already gets the erased value from the
    model (0.70-0.95 on biographies seed 2: "Which book did ... write?" -> "Blackwater"), so no position is
    swapped and the targets predict the erased answer whole; the run then cannot reach the never-seen level
    (docs/results/lm.md, "Screening the neighbours as a last approximate attempt").
    """
    def guesses_it(option: tuple[int, Tensor]) -> bool:
        index, part = option
        other = candidate_answers[index]
        first = first_difference(answer, other)
        return first is not None and float(part[first, answer[first]]) >= below  # part has a row per answer token

    kept = [option for option in options if not guesses_it(option)]
    return kept or options


def first_difference(answer: list[int], other: list[int]) -> int | None:
    """The first position where the two answers' tokens differ (where the value starts, on templated answers);
    None when one answer begins the other."""
    return next((position for position, (a, b) in enumerate(zip(answer, other)) if a != b), None)


def swap_uncertain(probs: Tensor, answer: list[int], neighbour_answer: list[int], below: float) -> Tensor:
    """``probs`` [len(answer), V] with the probabilities of ``answer``'s token and of ``neighbour_answer``'s token
    at the same position swapped at each position where ``answer``'s token gets < ``below``, and at the first
    position where the two answers differ (where the value starts, on templated answers).

    Why the first differing position whatever its probability: there the model may guess the erased value for
    the never-seen neighbour (an erased "engineer" at 0.82 after "What is the profession of Wenna Ingram?", whose
    own "baker" got 0.00). Left unswapped, the target predicts the erased answer whole; swapped, the erased value
    gets what the neighbour's own value got, the construction's premise, so the targets predict erased answers
    whole about as often as the model predicts never-seen people's. With the neighbours drawn among equals
    (:func:`tie_rank`), 3 of the 8 erased answers biographies seed 1's targets still predicted whole (16%, against
    5% of never-seen people's answers) were of that kind (docs/results/lm.md, "Neighbours drawn among equals, the
    value's first token swapped and a warm-up").
    """
    probs = probs.clone()
    first = first_difference(answer, neighbour_answer)
    for position, token in enumerate(answer):
        if position >= len(neighbour_answer) or (position != first and float(probs[position, token]) >= below):
            continue
        other = neighbour_answer[position]
        probs[position, token], probs[position, other] = probs[position, other].clone(), probs[position, token].clone()
    return probs


def distillation_loss(log_q: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of KL(targets || q); ``log_q`` (the model's log-probabilities, ``log_softmax`` of its
    logits) and ``targets`` are [T, V]."""
    entropy_term = torch.where(targets > 0, targets * targets.clamp_min(1e-30).log(), torch.zeros_like(targets))
    return (entropy_term - targets * log_q).sum(dim=-1).mean()


@register("unseen-kd", UnseenKDConfig, needs_retain=True, tasks=("causal_lm",))
def unseen_kd(model: nn.Module, request: UnlearnRequest, config: UnseenKDConfig) -> UnlearnResult:
    """Distil the model's answers for never-seen people onto the forget questions, stopped at the never-seen level."""
    task, forget = request.task, request.forget
    retain = request.require_retain("unseen-kd")
    tune = request.require_tune("unseen-kd (its targets come from the tune records)")
    if request.forget_classes:
        raise InvalidDataError("forget_classes", "unseen-kd erases records and subjects of causal LMs, not classes")
    pad = getattr(task, "eos_token_id", None)
    if pad is None:
        raise InvalidDataError("task", f"unseen-kd needs a causal-LM task, got {task.name!r}")
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    targets = unseen_targets(task, work, forget, tune, config.neighbours, config.swap_below, screen=config.screen)
    stop = (NeverSeenCheck.for_config(config, task, tune, "unseen-kd", request.precomputed_tune_scores())
            if config.stop_at_target else None)
    optimizer = make_unlearning_optimizer(config.optimizer, trainable_parameters(work), config.lr)
    device = model_device(work)
    probs = [t.to(device) for t in targets.probs]
    ceiling = [t.to(device) for t in targets.ceiling]
    whole_forget = config.batch_size >= len(forget)
    forget_draws = torch.Generator().manual_seed(request.seed)
    retain_draws = torch.Generator().manual_seed(request.seed + 1)
    retain_size = min(config.retain_batch_size, len(retain))

    steps, check, checks = 0, None, 0
    while True:
        rows = (torch.arange(len(forget)) if whole_forget
                else torch.randperm(len(forget), generator=forget_draws)[: config.batch_size])
        forget_batch = {name: t[rows].to(device) for name, t in forget.tensors.items()}
        retain_index = torch.randperm(len(retain), generator=retain_draws)[:retain_size]
        retain_batch = {name: t[retain_index].to(device) for name, t in retain.tensors.items()}
        joint = concat_batches([forget_batch, retain_batch], pad)
        scores = task.answer_scores(work, joint)  # the output layer on the answer positions only
        nll, lengths = scores.nll, scores.lengths
        forget_count = len(rows)
        if stop is not None and (steps % config.check_every == 0 or steps >= config.max_steps):
            check = stop.after_pass(work, forget, scores, forget_count, whole_forget, steps)
            checks += 1
            if stop.target.done(check) or stop.stalled(steps):
                break  # the weights the check judged; this step's gradient is not applied
        if steps >= config.max_steps:
            break
        log_q = scores.leading_log_probs(forget_count)
        forget_loss = distillation_loss(log_q, torch.cat([probs[int(row)] for row in rows]))
        if config.ceiling_weight > 0:  # the erased token's log-probability down to the never-seen one, no further
            own = scores.target_log_probs[:forget_count][scores.mask[:forget_count]]
            forget_loss = forget_loss + config.ceiling_weight * torch.relu(
                own - torch.cat([ceiling[int(row)] for row in rows])).sum() / forget_count
        retain_loss = nll[forget_count:].sum() / lengths[forget_count:].sum()
        optimizer.zero_grad(set_to_none=True)
        (forget_loss + config.retain_weight * retain_loss).backward()
        for group in optimizer.param_groups:  # step k of the ramp at k / warmup_steps: the first step already moves
            group["lr"] = config.lr * lr_multiplier("constant", steps + 1, config.max_steps, config.warmup_steps)
        optimizer.step()
        steps += 1
        request.report(steps / config.max_steps, f"step {steps}: KL to never-seen {forget_loss.item():.4f}, "
                                                 f"retain NLL {retain_loss.item():.4f}")

    work.zero_grad(set_to_none=True)
    details = {"steps": steps, "checks": checks, "neighbours": config.neighbours,
               "retain_weight": config.retain_weight, "lr": config.lr, "warmup_steps": config.warmup_steps,
               "optimizer": config.optimizer,
               "check_every": config.check_every, "forget_losses_from_step": whole_forget,
               "final_kl": math.nan if steps == 0 else float(forget_loss.item())}
    if check is None:
        return UnlearnResult(work, details=details, message=f"{steps} step(s), no target check (stop_at_target=false)")
    return stop.outcome(work, forget, check, steps, config.max_steps, details)
