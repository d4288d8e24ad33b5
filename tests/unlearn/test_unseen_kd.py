"""``unseen-kd``: its targets (never-seen neighbours, the erased value swapped for theirs), its loss, and its
stop rule on the tiny GPT of :mod:`tests.unlearn.lm_helpers`."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from difflib import SequenceMatcher

import pytest
import torch
import torch.nn.functional as F

from tests.unlearn.lm_helpers import lm_problem
from unlearn import registry
from unlearn.errors import InvalidDataError
from unlearn.heldout import score
from unlearn.membership import compare
from unlearn.methods.unseen_kd import (
    answer_rows,
    distillation_loss,
    nearest_prompts,
    screened,
    subject_tokens,
    swap_uncertain,
    tie_rank,
    unseen_targets,
)
from unlearn.registry import UnlearnRequest
from unlearn.tasks import accuracy

# Token ids: 1-4 the template ("Where", "was", "born", "?"), 10-19 names.
FORGET_PROMPTS = [[1, 2, 10, 11, 3, 4], [1, 5, 10, 11, 4]]  # one subject (7), two questions, name 10 11
CANDIDATES = [
    [1, 2, 10, 12, 3, 4],  # same template, shares the first name 10
    [1, 2, 13, 11, 3, 4],  # same template, shares the last name 11
    [1, 2, 14, 15, 3, 4],  # same template, another person
    [1, 5, 16, 17, 4],  # the second template, another person
    [1, 5, 18, 19, 4],
]


def test_subject_tokens_are_the_rare_tokens_every_prompt_of_the_subject_has():
    names = subject_tokens(FORGET_PROMPTS, [7, 7], CANDIDATES, max_share=0.3)
    assert names == {7: {10, 11}}  # 1 and 4 are in every candidate; 2, 3, 5 are not in both prompts


def test_nearest_prompts_skip_neighbours_that_share_the_erased_persons_name():
    nearest = nearest_prompts(FORGET_PROMPTS, [7, 7], CANDIDATES, count=1, max_share=0.3)
    assert nearest[0] == [2]  # not 0 or 1, though they are more similar
    assert nearest[1] in ([3], [4])  # the second template's two other people are equally similar
    # With no exclusion possible (every candidate shares a name token) the most similar are used.
    assert nearest_prompts([[1, 2, 10, 11, 3, 4]], [7], CANDIDATES[:2], count=2, max_share=0.3) in ([[0, 1]], [[1, 0]])


def test_the_pruned_neighbour_search_ranks_as_the_full_comparison_does():
    """The search stops early on quick_ratio's bound; the ranking (ties by tie_rank) must be the one every
    candidate's full difflib ratio gives. Small alphabets make many ties."""
    rng = random.Random(0)
    for _ in range(200):
        candidates = [[rng.randrange(6) for _ in range(rng.randrange(1, 8))] for _ in range(rng.randrange(1, 12))]
        prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 8))]
        count = rng.randrange(1, 4)
        ratios = [SequenceMatcher(None, prompt, c, autojunk=False).ratio() for c in candidates]
        brute = sorted(range(len(candidates)), key=lambda i: (-ratios[i], tie_rank(prompt, candidates[i]), i))[:count]
        assert nearest_prompts([prompt], [0], candidates, count, max_share=0.0) == [brute]


def test_equally_similar_neighbours_are_spread_over_the_forget_prompts_whatever_the_candidates_order():
    """Templated questions make every never-seen person's question of a kind equally similar. The neighbours must
    then be drawn among them for each prompt (a sample of never-seen people), not the first candidate for all."""
    candidates = [[1, 2, 100 + i, 200 + i, 3, 4] for i in range(40)]
    prompts = [[1, 2, 300 + i, 400 + i, 3, 4] for i in range(20)]
    nearest = nearest_prompts(prompts, list(range(20)), candidates, count=1, max_share=0.0)
    chosen = [row[0] for row in nearest]
    assert len(set(chosen)) >= 12  # 20 draws among 40: about 16 distinct; candidate order gave 1
    # The draw belongs to the pair, not to where the candidate stands in the list.
    order = list(range(40))
    random.Random(1).shuffle(order)
    shuffled = nearest_prompts(prompts, list(range(20)), [candidates[i] for i in order], count=1, max_share=0.0)
    assert [order[row[0]] for row in shuffled] == chosen
    assert nearest_prompts(prompts, list(range(20)), candidates, count=1, max_share=0.0) == nearest  # repeatable


def test_the_erased_token_gets_the_neighbours_true_token_probability_only_where_the_model_is_unsure():
    probs = torch.tensor([[0.05, 0.60, 0.30, 0.05],  # position 0: own token 3 (0.05 < 0.5), neighbour's 1
                          [0.00, 0.00, 0.99, 0.01]])  # position 1: own token 2 is sure (0.99): the frame
    swapped = swap_uncertain(probs, answer=[3, 2], neighbour_answer=[1, 2], below=0.5)
    assert swapped[0].tolist() == pytest.approx([0.05, 0.05, 0.30, 0.60])
    assert torch.equal(swapped[1], probs[1])
    assert torch.equal(probs[0], torch.tensor([0.05, 0.60, 0.30, 0.05]))  # the input is not changed
    # A neighbour with the same token, or a shorter answer, leaves the position as it is.
    assert torch.equal(swap_uncertain(probs, [1, 2], [1], 0.5), probs)


def test_the_first_position_where_the_answers_differ_is_swapped_even_when_the_model_guesses_the_erased_value():
    """The model may guess the erased value for the never-seen neighbour (token 1 at 0.60 here, the neighbour's own
    value 2 at 0.30): the erased value still gets what the neighbour's own value got, and a later sure position
    (the frame) or one whose tokens agree is left as it is."""
    probs = torch.tensor([[0.05, 0.05, 0.90, 0.00],  # the frame's first token, the same in both answers
                          [0.05, 0.60, 0.30, 0.05],  # the value: erased 1 (guessed, 0.60), the neighbour's 2
                          [0.00, 0.00, 0.01, 0.99]])  # the frame after it, different tokens but sure (0.99)
    swapped = swap_uncertain(probs, answer=[2, 1, 3], neighbour_answer=[2, 2, 0], below=0.5)
    assert swapped[1].tolist() == pytest.approx([0.05, 0.30, 0.60, 0.05])
    assert torch.equal(swapped[0], probs[0]) and torch.equal(swapped[2], probs[2])


def test_screening_drops_the_neighbours_whose_guess_is_the_erased_value_nearest_first():
    answer = [3, 2, 9]  # the erased answer: value token 3, then the frame 2, 9
    guess_it = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])  # 0.7 on token 3
    unsure = torch.tensor([[0.1, 0.6, 0.1, 0.2], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])  # 0.2 on token 3
    candidate_answers = [[1, 2, 9], [1, 2, 9], [3, 2, 9], [3, 5, 9]]
    # Candidate 0 guesses the erased value at the first position where its own answer differs: dropped.
    options = [(0, guess_it), (1, unsure)]
    assert [i for i, _ in screened(options, answer, candidate_answers, 0.5)] == [1]
    # A candidate whose own answer is the erased one does not differ anywhere: kept, whatever it guesses.
    assert [i for i, _ in screened([(2, guess_it), (1, unsure)], answer, candidate_answers, 0.5)] == [2, 1]
    # Judged at the first differing position: candidate 3's answer differs at 1, where the guess is the erased
    # answer's token 2 (1.0), though its guess at position 0 (the erased 3 at 0.2) is unsure.
    assert [i for i, _ in screened([(3, unsure), (1, unsure)], answer, candidate_answers, 0.5)] == [1]
    # When every candidate guesses it, all stay (nearest first).
    assert [i for i, _ in screened([(0, guess_it), (1, guess_it)], answer, candidate_answers, 0.5)] == [0, 1]


def test_screening_off_or_over_one_neighbour_gives_the_plain_targets_and_never_more_whole_answers():
    problem = lm_problem()

    def targets(screen):
        return unseen_targets(problem.task, problem.model, problem.forget, problem.holdout, neighbours=1,
                              swap_below=0.5, screen=screen).probs

    plain, answers = targets(0), answer_rows(problem.forget)
    # Screening the nearest alone keeps it (kept, or all when it guesses the value): the plain targets.
    assert all(torch.equal(a, b) for a, b in zip(plain, targets(1)))

    def whole(probs):
        return sum(bool((p.argmax(dim=-1) == torch.tensor(a)).all()) for p, a in zip(probs, answers))

    assert whole(targets(4)) <= whole(plain)


def test_distillation_loss_is_the_kl_divergence_and_zero_at_the_target():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    targets = torch.tensor([[0.2, 0.8, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    q = F.softmax(logits, dim=-1)
    by_hand = [0.2 * math.log(0.2 / q[0, 0]) + 0.8 * math.log(0.8 / q[0, 1]),
               sum(1 / 3 * math.log((1 / 3) / q[1, j]) for j in range(3))]
    log_q = F.log_softmax(logits, dim=-1)
    assert float(distillation_loss(log_q, targets)) == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert float(distillation_loss(log_q, q)) == pytest.approx(0.0, abs=1e-6)


def test_targets_swap_the_erased_values_with_never_seen_peoples():
    problem = lm_problem()
    targets = unseen_targets(problem.task, problem.model, problem.forget, problem.holdout, neighbours=1, swap_below=0.5)
    answers = answer_rows(problem.forget)
    assert len(targets.probs) == len(answers)
    unsure_answers = 0
    for probs, ceiling, answer in zip(targets.probs, targets.ceiling, answers):
        assert probs.shape == (len(answer), problem.model.get_input_embeddings().weight.shape[0])
        assert torch.allclose(probs.sum(dim=-1), torch.ones(len(answer)), atol=1e-5)
        own = probs[torch.arange(len(answer)), torch.tensor(answer)]
        unsure = own < 0.5
        unsure_answers += bool(unsure.any())
        assert torch.equal(ceiling[unsure], own[unsure].log()) and bool((ceiling[~unsure] == 0).all())
    # The model recites every forget answer; after a never-seen person's question most have a position it is
    # unsure of (the fact), and there the erased token's target is what it gives the neighbour's own value.
    assert unsure_answers >= len(answers) // 2


TINY = {"lr": 5e-3, "retain_weight": 20.0, "max_steps": 40, "batch_size": 16, "retain_batch_size": 32,
        "check_every": 2}


def test_unseen_kd_reaches_the_never_seen_level_and_keeps_the_retained_answers():
    problem = lm_problem()
    retain_before = accuracy(problem.task, problem.model, problem.retain)
    result = registry.run("unseen-kd", problem.model, problem.request(), TINY)
    assert result.target_reached is True, result.message
    assert result.details["steps"] < TINY["max_steps"]
    stop = compare(problem.task, result.model, problem.forget, problem.holdout)
    assert stop.ks_p_value >= 0.1 and stop.auc <= 0.55
    assert accuracy(problem.task, result.model, problem.retain) >= retain_before - 0.1


@pytest.mark.parametrize("warmup", [5, 0])
def test_the_learning_rate_warms_up_over_the_first_steps(warmup):
    """Adam's first update moves every weight with a gradient by about lr (its second moment is one squared
    gradient): with the warm-up the first step moves none by more than lr / warmup_steps."""
    problem = lm_problem()
    params = {**TINY, "max_steps": 1, "stop_at_target": False, "warmup_steps": warmup, "lr": 1e-3}
    result = registry.run("unseen-kd", problem.model, problem.request(), params)
    moved = max(float((after - before).detach().abs().max()) for after, before in
                zip(result.model.parameters(), problem.model.parameters()))
    assert result.details["warmup_steps"] == warmup
    assert moved == pytest.approx(1e-3 / max(warmup, 1), rel=0.02)


def test_unseen_kd_says_when_its_budget_ran_out():
    problem = lm_problem()
    result = registry.run("unseen-kd", problem.model, problem.request(), {**TINY, "max_steps": 2})
    assert result.target_reached is False
    assert "budget of 2 exhausted" in result.message and result.details["steps"] == 2
    assert result.details["stop_membership_tune"]["auc"] > 0.55


def test_unseen_kd_needs_tune_records_and_valid_parameters():
    problem = lm_problem()
    no_tune = UnlearnRequest(task=problem.task, forget=problem.forget, retain=problem.retain, tune=None)
    with pytest.raises(InvalidDataError, match="tune"):
        registry.run("unseen-kd", problem.model, no_tune, TINY)
    for field, value in (("neighbours", 0), ("swap_below", 1.5), ("retain_weight", -1.0), ("ceiling_weight", -1.0),
                         ("stall_steps", 0), ("screen", -1), ("warmup_steps", -1)):
        with pytest.raises(Exception, match=field):
            registry.parse_config("unseen-kd", {field: value})


@pytest.mark.parametrize("method", ["unseen-kd", "simnpo+rt"])
def test_precomputed_tune_scores_replace_the_first_pass_and_change_nothing_else(method):
    """The service keeps the unchanged model's tune scores per version (UnlearnRequest.tune_scores); a run that
    reads them must stop where a run that computes them does, with one pass over the tune records fewer."""
    problem = lm_problem()
    params = TINY if method == "unseen-kd" else {"max_steps": 6, "batch_size": 16, "retain_batch_size": 32}
    computed = registry.run(method, problem.model, problem.request(), params)
    request = replace(problem.request(), tune_scores=score(problem.task, problem.model, problem.holdout))
    precomputed = registry.run(method, problem.model, request, params)
    assert precomputed.details["tune_scores"] == "precomputed for the model version"
    assert computed.details["tune_scores"] == "computed for this request"
    assert precomputed.details["tune_refreshes"] == computed.details["tune_refreshes"] - 1
    assert precomputed.details["steps"] == computed.details["steps"]
    assert precomputed.message == computed.message
    for a, b in zip(computed.model.parameters(), precomputed.model.parameters()):
        assert torch.equal(a, b)
    wrong = replace(problem.request(), tune_scores=score(problem.task, problem.model, problem.forget))
    with pytest.raises(InvalidDataError, match="tune_scores"):
        registry.run(method, problem.model, wrong, params)
    if method == "simnpo+rt":  # without the stop check, its fade's quantile reads them too
        with pytest.raises(InvalidDataError, match="tune_scores"):
            registry.run(method, problem.model, wrong, {**params, "stop_at_target": False})
