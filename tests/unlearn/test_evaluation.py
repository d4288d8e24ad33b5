"""Evaluation metrics on constructed cases."""

import pytest
import torch
from torch import nn

from unlearn.data import classification_examples
from unlearn.evaluation import ClassificationMetrics, avg_gap, loss_attack_auc, softmax_entropy
from unlearn.tasks import ClassificationTask


class FixedLogits(nn.Module):
    """Returns the first 2 input features as logits, so tests choose the outputs."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, inputs):
        return inputs[:, :2]


def test_entropy_of_uniform_and_certain_outputs():
    entropy = softmax_entropy(torch.tensor([[0.0, 0.0], [100.0, -100.0]]))
    assert entropy[0] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert entropy[1] == pytest.approx(0.0, abs=1e-12)


def test_loss_attack_separates_confident_members_from_unsure_non_members():
    task = ClassificationTask(2)
    members = classification_examples(torch.tensor([[5.0, -5.0]] * 4), torch.zeros(4))
    strangers = classification_examples(torch.tensor([[0.1, 0.0]] * 4), torch.zeros(4))
    assert loss_attack_auc(task, FixedLogits(), members, strangers) == 1.0
    assert loss_attack_auc(task, FixedLogits(), strangers, members) == 0.0


def test_avg_gap_is_mean_absolute_difference_over_four_metrics():
    a = ClassificationMetrics(0.0, 1.0, 0.9, 0.95, 0.1, 0.5)
    b = ClassificationMetrics(0.1, 0.9, 0.9, 0.10, 0.3, 0.9)  # test_retain_acc and auc are not in the gap
    assert avg_gap(a, b) == pytest.approx((0.1 + 0.1 + 0.0 + 0.2) / 4)
