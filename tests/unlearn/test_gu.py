"""GU (arXiv 2511.17100): the basis, the projection in both metrics, the joint rule, and proof that the
projection really runs inside ``gu+ga`` / ``gu+iau`` (the update is orthogonal to the retain gradients)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unlearn import registry
from unlearn.data import ExampleSet
from unlearn.errors import InvalidParameterError
from unlearn.gradients import (
    JointRule,
    adam_whitening,
    flat_gradient,
    gu_direction,
    orthonormal_basis,
    parameter_blocks,
    project_out,
    write_gradient,
)
from unlearn.tasks import ClassificationTask


def _random(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_basis_is_orthonormal_and_skips_dependent_directions():
    candidates = _random((5, 40), seed=0)
    candidates[2] = 3.0 * candidates[0] - 0.5 * candidates[1]  # dependent: must not join
    candidates[3] = 0.0  # zero: must not join
    basis = orthonormal_basis(candidates, rank=8)
    assert basis.shape == (40, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert orthonormal_basis(candidates, rank=2).shape == (40, 2)
    # the span is the candidates' span: every kept candidate is reproduced by the basis
    for row in (0, 1, 4):
        torch.testing.assert_close(basis @ (basis.T @ candidates[row]), candidates[row], rtol=0, atol=1e-10)


def test_basis_tolerance_is_relative_to_the_candidate_norm():
    tiny = 1e-9 * _random((3, 10), seed=1)  # a converged model's gradients are tiny, not dependent
    assert orthonormal_basis(tiny, rank=3).shape == (10, 3)


def test_euclidean_projection_is_orthogonal_to_every_retain_gradient():
    retain = _random((8, 200), seed=2)
    forget = _random((200,), seed=3)
    projection = gu_direction(forget, retain, [slice(0, 200)], rank=8)
    cosines = (retain @ projection.direction) / (retain.norm(dim=1) * projection.direction.norm())
    assert cosines.abs().max() < 1e-12
    assert projection.rank == 8 and 0 < projection.removed_fraction < 1
    # it is the residual of least squares: what was removed lies in the span
    removed = forget - projection.direction
    coefficients = torch.linalg.lstsq(retain.T, removed.unsqueeze(1)).solution
    torch.testing.assert_close(retain.T @ coefficients.squeeze(1), removed, rtol=0, atol=1e-10)


def test_projection_is_a_no_op_when_the_forget_gradient_is_already_orthogonal():
    retain = _random((4, 50), seed=4)
    forget = project_out(orthonormal_basis(retain, rank=4), _random((50,), seed=5))
    projection = gu_direction(forget, retain, [slice(0, 50)], rank=4)
    torch.testing.assert_close(projection.direction, forget, rtol=0, atol=1e-12)
    assert projection.removed_fraction < 1e-24


def test_adam_metric_projection_is_orthogonal_after_whitening():
    retain = _random((6, 80), seed=6)
    forget = _random((80,), seed=7)
    whitening = 0.1 + _random((80,), seed=8).abs()  # any positive diagonal S
    projection = gu_direction(forget, retain, [slice(0, 80)], rank=6, whitening=whitening)
    # orthogonal in the metric P = S^2 that Adam applies: g_r^T P d = (S g_r)^T (S d) = 0
    inner = (retain * whitening) @ (whitening * projection.direction)
    assert (inner.abs() / ((retain * whitening).norm(dim=1) * (whitening * projection.direction).norm())).max() < 1e-12
    # but not, in general, in the Euclidean one
    assert (retain @ projection.direction).abs().max() > 1e-3


def test_per_tensor_scope_projects_each_block():
    params = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))]
    blocks = parameter_blocks(params, "per-tensor")
    assert blocks == [slice(0, 12), slice(12, 17)] and parameter_blocks(params, "global") == [slice(0, 17)]
    retain, forget = _random((2, 17), seed=9), _random((17,), seed=10)
    direction = gu_direction(forget, retain, blocks, rank=2).direction
    for block in blocks:
        assert (retain[:, block] @ direction[block]).abs().max() < 1e-12


def test_joint_rule_by_hand():
    # basis e1, e2 in R^3; z_f = (1, -1, 1); z_r = mean of e1 and e2 = (0.5, 0.5, 0)
    retain = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    forget = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    # a = (1, -1), b = (0.5, 0.5): only component 1 also lowers the retain loss (a_1 b_1 > 0) and is kept;
    # its norm 1 is within the cap 1 * ||z_perp|| = 1; then + beta_rep * Q b = 0.2 * (0.5, 0.5, 0)
    joint = JointRule(tau=0.0, tangent_cap=1.0, beta_rep=0.2)
    direction = gu_direction(forget, retain, [slice(0, 3)], rank=2, joint=joint).direction
    torch.testing.assert_close(direction, torch.tensor([1.1, 0.1, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)
    capped = gu_direction(forget, retain, [slice(0, 3)], rank=2, joint=JointRule(0.0, 0.5, 0.0)).direction
    torch.testing.assert_close(capped, torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_adam_whitening_reads_the_optimiser_second_moment():
    parameter = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    optimizer = torch.optim.Adam([parameter], lr=0.1)
    first = torch.tensor([0.5, -2.0, 0.0])
    # before any step: v_hat = g^2 of the gradient about to be applied
    torch.testing.assert_close(adam_whitening(optimizer, [parameter], first), (first.abs() + 1e-8).rsqrt())
    write_gradient([parameter], first)
    optimizer.step()
    # after one step Adam's own bias-corrected v_hat is g^2 again
    torch.testing.assert_close(adam_whitening(optimizer, [parameter], torch.zeros(3)), (first.abs() + 1e-8).rsqrt())


# --- the projection runs inside the registered methods ---------------------------------------------------------

TASK = ClassificationTask(3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _examples(seed: int, count: int, labels: list[int]) -> ExampleSet:
    inputs = _random((count, 4), seed)
    return ExampleSet({"inputs": inputs, "labels": torch.tensor(labels)})


FORGET = _examples(11, 4, [0, 0, 1, 2])
RETAIN = _examples(12, 6, [1, 2, 0, 1, 2, 0])


def _per_example_retain_gradients(model: nn.Module) -> torch.Tensor:
    params = [p for p in model.parameters()]
    rows = []
    for index in range(len(RETAIN)):
        batch = next(RETAIN.subset([index]).batches(1))
        rows.append(flat_gradient(TASK.batch_loss(model, batch), params))
    return torch.stack(rows)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _request() -> registry.UnlearnRequest:
    return registry.UnlearnRequest(task=TASK, forget=FORGET, retain=RETAIN, tune=RETAIN, seed=0)


def test_gu_ga_step_is_orthogonal_to_every_retain_gradient():
    """One plain-SGD step of gu+ga, with the basis spanning EVERY retain example's gradient (rank 6, batches of
    1): the weight change is orthogonal to all of them, so the retain loss is unchanged to first order."""
    model = _model()
    retain_gradients = _per_example_retain_gradients(model)
    params = {"optimizer": "sgd", "metric": "euclidean", "lr": 0.1, "rank": 6, "basis_batch_size": 1,
              "batch_size": 4, "max_steps": 1, "stop_at_target": False}
    result = registry.run("gu+ga", model, _request(), params)
    change = _flat(result.model) - _flat(model)
    cosines = (retain_gradients @ change) / (retain_gradients.norm(dim=1) * change.norm())
    assert cosines.abs().max() < 1e-10
    assert result.details["rank"] == 6 and result.details["removed_fraction_mean"] > 0.01
    # and it really differs from plain gradient ascent, whose step is not orthogonal
    plain = registry.run("ga", model, _request(), {k: v for k, v in params.items()
                                                   if k not in ("metric", "rank", "basis_batch_size")})
    plain_change = _flat(plain.model) - _flat(model)
    assert ((retain_gradients @ plain_change) / (retain_gradients.norm(dim=1) * plain_change.norm())).abs().max() > 0.05


def test_gu_graddiff_keeps_the_retain_term_and_projects_the_forget_term():
    model = _model()
    retain_gradients = _per_example_retain_gradients(model)
    params = {"optimizer": "sgd", "metric": "euclidean", "lr": 0.1, "rank": 6, "basis_batch_size": 1,
              "batch_size": 6, "max_steps": 1, "stop_at_target": False, "alpha": 1.0}
    result = registry.run("gu+graddiff", model, _request(), params)
    retain_mean_gradient = flat_gradient(TASK.batch_loss(model, next(RETAIN.batches(6))), list(model.parameters()))
    forget_part = (_flat(result.model) - _flat(model)) + 0.1 * retain_mean_gradient
    assert ((retain_gradients @ forget_part) / (retain_gradients.norm(dim=1) * forget_part.norm())).abs().max() < 1e-10


def test_gu_iau_sgd_step_projects_the_forget_ascent():
    model = _model()
    retain_gradients = _per_example_retain_gradients(model)
    params = {"update": "sgd", "sgd_lr": 0.5, "max_steps": 1, "stop_at_target": False, "metric": "euclidean",
              "rank": 6, "basis_batch_size": 1}
    result = registry.run("gu+iau", model, _request(), params)
    retain_mean_gradient = flat_gradient(TASK.batch_loss(model, next(RETAIN.batches(6))), list(model.parameters()))
    forget_part = (_flat(result.model) - _flat(model)) + 0.5 * retain_mean_gradient
    assert ((retain_gradients @ forget_part) / (retain_gradients.norm(dim=1) * forget_part.norm())).abs().max() < 1e-10
    assert result.details["rank"] == 6


def test_gu_configs_carry_the_base_fields_and_validate_both():
    config = registry.parse_config("gu+npo", {"beta": 0.2, "rank": 4})
    assert config.base().beta == 0.2 and config.settings().rank == 4
    for name, params, field in [("gu+npo", {"beta": -1.0}, "beta"), ("gu+ga", {"rank": 1000}, "rank"),
                                ("gu+ga", {"metric": "riemann"}, "metric")]:
        with pytest.raises(InvalidParameterError) as error:
            registry.parse_config(name, params)
        assert error.value.field == field


@pytest.mark.parametrize("name", ["gu+ga", "gu+graddiff", "gu+npo", "gu+iau", "gu+flat", "gu+simnpo"])
def test_gu_configs_are_written_out_with_the_base_and_gu_defaults(name):
    """The configs are plain dataclasses (STYLE.md: no make_dataclass); their defaults must not drift."""
    import dataclasses

    from unlearn.methods.gu import GUSettings

    config_cls = registry.get(name).config_cls
    assert config_cls.__module__ == "unlearn.methods.gu" and "make_dataclass" not in (config_cls.__doc__ or "")
    default = config_cls()
    base = default.base()
    for field in dataclasses.fields(type(base)):
        assert getattr(default, field.name) == getattr(type(base)(), field.name), f"{name}.{field.name} drifted"
    for field in dataclasses.fields(GUSettings):
        assert getattr(default, field.name) == getattr(GUSettings(), field.name), f"{name}.{field.name} drifted"
    names = [f.name for f in dataclasses.fields(config_cls)]
    assert names == [f.name for f in dataclasses.fields(type(base))] + [f.name for f in dataclasses.fields(GUSettings)]
