"""Each strategy's maths pinned on tiny cases computed by hand (STYLE.md habit 7)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from continual import registry
from continual.losses import distill_loss, keep_columns, logit_mse, output_rows
from continual.strategies.ewc import current_fisher, ewc_penalty
from continual.strategies.gere import margin_loss, thresholds
from continual.strategies.hft import choose_frozen_half, freeze, matrix_groups
from continual.strategies.lwf import lwf_loss
from continual.strategies.wise_ft import coefficient_grid, interpolate
from tests.continual.helpers import class_problem
from unlearn.data import ExampleSet
from unlearn.importance import estimate_importance


# ---- LwF -------------------------------------------------------------------------------------------------
def test_lwf_loss_value_by_hand():
    # Teacher logits [ln 3, 0] at T = 1 give p* = [3/4, 1/4]; the student's [0, 0] give q = [1/2, 1/2].
    # KL(p* || q) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...
    teacher, student = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(distill_loss(student, teacher, 1.0)) == pytest.approx(kl, abs=1e-6)
    # At T = 2 the teacher's softened probabilities are softmax([ln 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1),
    # and the loss carries T^2 = 4; L = L_new + alpha * T^2 * KL with L_new = 1, alpha = 0.5.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl_t2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    value = lwf_loss(torch.tensor(1.0), student, teacher, alpha=0.5, temperature=2.0)
    assert float(value) == pytest.approx(1.0 + 0.5 * 4 * kl_t2, abs=1e-6)


def test_lwf_distills_neither_new_classes_nor_answer_positions():
    logits = torch.arange(12.0).reshape(2, 6)
    assert keep_columns(logits, (1, 4)).tolist() == [[0.0, 2.0, 3.0, 5.0], [6.0, 8.0, 9.0, 11.0]]
    # Causal LM: logits at position t predict token t + 1. Sequence of 4 real tokens, the last two answers.
    outputs = torch.arange(4.0).reshape(1, 4, 1).repeat(1, 1, 3)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1]]), "answer_mask": torch.tensor([[0, 0, 1, 1]])}
    assert output_rows(outputs, batch, "targets")[:, 0].tolist() == [1.0, 2.0]  # positions predicting answers
    assert output_rows(outputs, batch, "context")[:, 0].tolist() == [0.0]  # the prompt position


# ---- EWC -------------------------------------------------------------------------------------------------
def test_ewc_penalty_and_its_gradient_by_hand():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, -1.0]]))
    anchor = {"weight": torch.tensor([[1.0, 1.0]])}
    fisher = {"weight": torch.tensor([[0.5, 2.0]])}
    penalty = ewc_penalty(model, anchor, fisher, lam=10.0)
    # (lambda / 2) * sum F (theta - theta*)^2 = 5 * (0.5 * 1 + 2 * 4) = 42.5
    assert float(penalty.detach()) == pytest.approx(42.5)
    penalty.backward()
    # d/dtheta = lambda * F * (theta - theta*) = 10 * [0.5 * 1, 2 * (-2)] = [5, -40]
    assert model.weight.grad.tolist() == [[5.0, -40.0]]


def test_ewc_fisher_is_unlearns_importance_and_state_is_bound_to_weights():
    problem = class_problem()
    request = problem.request()
    fisher, source = current_fisher(problem.model, request, batch_size=1)
    expected = estimate_importance(problem.task, problem.model, problem.retain, 1, "fisher")
    assert source.startswith("recomputed") and all(torch.equal(fisher[n], expected[n]) for n in expected)

    result = registry.run("ewc", problem.model, request)
    assert result.state.belongs_to("ewc", result.model)
    carried, source = current_fisher(result.model, problem.request(state=result.state), batch_size=1)
    assert source == "carried" and all(torch.equal(carried[n], result.state.tensors[n]) for n in carried)
    # Any change of the weights (an erasure in between) makes the state unusable: recomputed at the new version.
    with torch.no_grad():
        next(result.model.parameters()).mul_(0.5)
    _, source = current_fisher(result.model, problem.request(state=result.state), batch_size=1)
    assert source == "recomputed (carried state belongs to other weights)"


def test_ewc_online_update_is_gamma_times_previous_plus_new():
    problem = class_problem()
    result = registry.run("ewc", problem.model, problem.request(), {"gamma": 0.5})
    previous = estimate_importance(problem.task, problem.model, problem.retain, 1, "fisher")
    new = estimate_importance(problem.task, result.model, problem.update, 1, "fisher")
    for name, tensor in result.state.tensors.items():
        assert torch.allclose(tensor, 0.5 * previous[name] + new[name], atol=1e-7)


# ---- DER++ -------------------------------------------------------------------------------------------------
def test_der_logit_term_by_hand():
    # MSE over rows and classes: ((1 - 0)^2 + (2 - 0)^2) / 2 = 2.5
    assert float(logit_mse(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]))) == pytest.approx(2.5)


@pytest.mark.parametrize("name, params", [("replay", {"alpha": 0.0, "beta": 0.0}), ("lwf", {"alpha": 0.0}),
                                          ("ewc", {"lam": 0.0})])
def test_a_zero_weighted_term_leaves_plain_finetuning(name, params):
    """Each anti-forgetting term is added to L_new and nothing else: weighted 0, the run IS finetune's."""
    problem = class_problem()
    plain = registry.run("finetune", problem.model, problem.request())
    zeroed = registry.run(name, problem.model, problem.request(), params)
    for a, b in zip(plain.model.state_dict().values(), zeroed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_replay_terms_change_the_result_and_fill_the_buffer():
    problem = class_problem()
    er = registry.run("replay", problem.model, problem.request(), {"alpha": 0.0, "beta": 1.0})
    der = registry.run("replay", problem.model, problem.request(), {"alpha": 1.0, "beta": 0.0})
    plain = registry.run("finetune", problem.model, problem.request())
    assert er.details["variant"] == "er" and der.details["variant"] == "der"
    assert not torch.equal(er.model.layers[2].weight, plain.model.layers[2].weight)
    assert not torch.equal(der.model.layers[2].weight, er.model.layers[2].weight)
    # The update's rows were offered to the reservoir with their logits.
    assert any(record.startswith("update-") for record in der.buffer.record_ids)


# ---- GeRe --------------------------------------------------------------------------------------------------
def test_gere_hinge_by_hand():
    pos, neg = torch.full((3,), 0.5), torch.full((3,), -0.5)
    high = torch.tensor([[[True, False, True]]])
    low = torch.tensor([[[False, True, False]]])
    inside = torch.tensor([[[1.0, -1.0, 0.5]]])  # every constrained entry is on its side: no loss
    assert float(margin_loss(inside, pos, neg, high, low)) == 0.0
    crossed = torch.tensor([[[0.2, -0.2, 0.9]]])
    # high entry 0: relu(0.5 - 0.2) = 0.3; low entry 1: relu(-0.2 + 0.5) = 0.3; high entry 2: 0. Mean over 3.
    assert float(margin_loss(crossed, pos, neg, high, low)) == pytest.approx(0.2)


class _FixedHidden(nn.Module):
    """A stand-in LM whose last hidden states are fixed, to pin GeRe's thresholds."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, output_hidden_states):
        return SimpleNamespace(hidden_states=[self.hidden[: input_ids.shape[0]]])


def test_gere_thresholds_are_mean_plus_minus_std_over_real_tokens():
    hidden = torch.tensor([[[0.0], [2.0], [100.0]], [[4.0], [6.0], [100.0]]])  # the 100s are padding
    generic = ExampleSet({"input_ids": torch.zeros(2, 3, dtype=torch.long),
                          "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 0]])})
    limits = thresholds(_FixedHidden(hidden), generic)
    # Real tokens 0, 2, 4, 6: mu = 3, sigma (population) = sqrt(5).
    assert float(limits.pos) == pytest.approx(3 + math.sqrt(5))
    assert float(limits.neg) == pytest.approx(3 - math.sqrt(5))
    assert limits.high[:, :, 0].tolist() == [[False, False, False], [False, True, False]]  # 6 > 5.236
    assert limits.low[:, :, 0].tolist() == [[True, False, False], [False, False, False]]  # 0 < 0.764


# ---- HFT ---------------------------------------------------------------------------------------------------
class _Blocks(nn.Module):
    """Two transformer-like blocks: attention (q, k, v, o) and FFN (fc1, fc2) matrices, plus a norm and a head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({
            "attn": nn.ModuleDict({n: nn.Linear(4, 4) for n in ("q", "k", "v", "o")}),
            "mlp": nn.ModuleDict({n: nn.Linear(4, 4) for n in ("fc1", "fc2")}),
            "norm": nn.LayerNorm(4)}) for _ in range(2)])
        self.head = nn.Linear(4, 3)


def test_hft_freezes_exactly_half_of_each_category():
    model = _Blocks()
    groups = matrix_groups(model)
    assert groups["blocks.0.attn"] == [f"blocks.0.attn.{n}.weight" for n in ("q", "k", "v", "o")]
    frozen = choose_frozen_half(model, seed=3)
    total = sum(len(members) for members in groups.values())  # 2 * (4 + 2) + 1 head = 13
    assert len(frozen) == total // 2 == 6
    for group, members in groups.items():
        if len(members) % 2 == 0:
            assert sum(name in frozen for name in members) == len(members) // 2, group
    assert choose_frozen_half(model, seed=3) == frozen and choose_frozen_half(model, seed=4) != frozen
    names = freeze(model, frozen)
    for name, parameter in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        expected = name in frozen or (name.endswith(".bias") and f"{owner}.weight" in frozen)
        assert parameter.requires_grad == (not expected), name
        assert (name in names) == expected
    assert all(p.requires_grad for n, p in model.named_parameters() if ".norm." in n)  # norms keep training


def test_hft_halves_the_trainable_matrices_only():
    model = _Blocks()
    for parameter in model.blocks[0]["attn"].parameters():  # registered frozen (a pretrained part)
        parameter.requires_grad_(False)
    frozen = choose_frozen_half(model, seed=3)
    assert not any(name.startswith("blocks.0.attn.") for name in frozen)
    assert len(frozen) == (13 - 4) // 2


def test_hft_leaves_the_frozen_half_exactly_unchanged():
    problem = class_problem()
    result = registry.run("hft", problem.model, problem.request(seed=1))
    frozen = set(result.details["frozen_parameters"])
    assert result.details["frozen_matrices"] == ["layers.0.weight"]
    for (name, before), after in zip(problem.model.named_parameters(), result.model.parameters()):
        assert torch.equal(before, after) == (name in frozen), name


# ---- WiSE-FT -----------------------------------------------------------------------------------------------
def test_wise_ft_interpolation_by_hand():
    anchor, updated = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        anchor.weight.copy_(torch.tensor([1.0, 2.0]))
        updated.weight.copy_(torch.tensor([3.0, -2.0]))
    updated.num_batches_tracked.fill_(7)
    mixed = interpolate(anchor, updated, 0.25)
    assert mixed.weight.tolist() == [1.5, 1.0]  # 0.75 * [1, 2] + 0.25 * [3, -2]
    assert int(mixed.num_batches_tracked) == 7  # integer buffers come from the updated model
    assert coefficient_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_wise_ft_keeps_the_largest_coefficient_that_passes_the_floor():
    problem = class_problem()
    result = registry.run("wise-ft+finetune", problem.model, problem.request(), {"grid_steps": 10})
    search = result.details["wise_ft"]
    chosen = search["coefficient"]
    assert search["selected_on"] == "tune"
    assert all(trial["tune_accuracy"] < search["floor"] for trial in search["trials"] if trial["coefficient"] > chosen)
    assert search["trials"][-1]["coefficient"] == chosen and search["trials"][-1]["tune_accuracy"] >= search["floor"]
    assert result.target_reached == (chosen > 0)
    everything = registry.run("wise-ft+finetune", problem.model, problem.request(), {"max_utility_drop": 1.0})
    assert everything.details["wise_ft"]["coefficient"] == 1.0
