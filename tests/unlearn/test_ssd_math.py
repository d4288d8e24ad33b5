"""SSD's arithmetic pinned on models small enough to compute by hand (arXiv 2308.07707, Eq. 3-4)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn.data import classification_examples
from unlearn.importance import estimate_importance
from unlearn.methods.assd import percentile_alpha
from unlearn.methods.ssd import dampen_
from unlearn.tasks import ClassificationTask


def one_weight_model(values):
    model = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([values]))
    return model


def test_selection_is_strict_and_beta_is_lambda_times_ratio():
    model = one_weight_model([1.0, 2.0, 3.0, 4.0])
    train = {"weight": torch.tensor([[1.0, 1.0, 1.0, 2.0]])}
    forget = {"weight": torch.tensor([[10.0, 20.0, 5.0, 20.0]])}
    # alpha = 10: element 0 has I_Df == alpha * I_D exactly -> NOT selected (strict); element 1: 20 > 10
    # -> beta = 1 * 1 / 20; element 2: 5 < 10 -> kept; element 3: 20 > 20 is false -> kept.
    stats = dampen_(model, train, forget, alpha=10.0, lam=1.0)
    assert model.weight.tolist() == [[1.0, pytest.approx(2.0 / 20), 3.0, 4.0]]
    assert stats["selected_elements"] == 1
    assert stats["selected_fraction"] == 0.25


def test_beta_is_clamped_to_one():
    # alpha 0.5 selects an element with ratio 2; lambda 4 would give beta = 4 * 1 / 2 = 2 -> clamped to 1.
    model = one_weight_model([3.0, 3.0])
    dampen_(model, {"weight": torch.tensor([[1.0, 1.0]])}, {"weight": torch.tensor([[2.0, 8.0]])},
            alpha=0.5, lam=4.0)
    # element 1: ratio 8 -> beta = 4 / 8 = 0.5
    assert model.weight.tolist() == [[3.0, 1.5]]


def test_zero_training_importance_selects_and_zeroes():
    model = one_weight_model([5.0, 5.0])
    dampen_(model, {"weight": torch.tensor([[0.0, 0.0]])}, {"weight": torch.tensor([[1e-9, 0.0]])},
            alpha=10.0, lam=1.0)
    # I_D == 0 < I_Df: selected, beta = 0. I_D == I_Df == 0: 0 > 0 is false, kept.
    assert model.weight.tolist() == [[0.0, 5.0]]


def test_fisher_is_mean_of_squared_batch_mean_gradients():
    task = ClassificationTask(2)
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5], [-0.5]]))
    inputs = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
    labels = torch.tensor([0, 1, 1, 0])
    examples = classification_examples(inputs, labels)

    def batch_gradient(x, y):  # d/dW mean CE = mean_b (softmax(W x_b) - onehot(y_b)) x_b^T
        probs = torch.softmax(x @ model.weight.detach().T, dim=1)
        return ((probs - F.one_hot(y, 2)).T @ x) / len(y)

    expected = (batch_gradient(inputs[:2], labels[:2]) ** 2 + batch_gradient(inputs[2:], labels[2:]) ** 2) / 2
    importance = estimate_importance(task, model, examples, batch_size=2)
    torch.testing.assert_close(importance["weight"], expected)
    # squares of BATCH gradients: a different batch size gives a different value
    assert not torch.allclose(estimate_importance(task, model, examples, batch_size=4)["weight"], expected)


def test_label_free_importance_is_abs_gradient_of_output_energy():
    task = ClassificationTask(2)
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    examples = classification_examples(inputs, torch.tensor([0, 1]))
    # d/dW mean_b ||W x_b||^2 = mean_b 2 (W x_b) x_b^T; one batch, so the importance is its |.|
    expected = (2 * (inputs @ model.weight.detach().T).T @ inputs / 2).abs()
    importance = estimate_importance(task, model, examples, batch_size=2, variant="label_free")
    torch.testing.assert_close(importance["weight"], expected)


def test_importance_is_computed_in_eval_mode_and_mode_is_restored():
    task = ClassificationTask(2)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    examples = classification_examples(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    model.train()
    first = estimate_importance(task, model, examples, 4)
    second = estimate_importance(task, model, examples, 4)
    assert model.training  # restored
    for name in first:  # dropout off: deterministic
        torch.testing.assert_close(first[name], second[name])


def test_assd_percentile_rule():
    ratio = {"w": torch.arange(1, 101, dtype=torch.float32), "nan": torch.tensor([math.nan, math.inf])}
    alpha, percentile = percentile_alpha(ratio, forget_size=10, train_size=100)
    assert percentile == pytest.approx(100 - math.log(1 + 100 * 10 / 100))
    assert alpha == pytest.approx(float(torch.quantile(torch.arange(1, 101, dtype=torch.float64), percentile / 100)))
