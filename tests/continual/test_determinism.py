"""Same seed, same weights (shuffling, sampling and dropout are seeded); a batch of one never meets batch norm."""

from __future__ import annotations

import torch
from torch import nn

from continual import registry
from continual.training import batch_slices
from tests.continual.helpers import RECIPE, blobs, keys
from unlearn.tasks import ClassificationTask


class _DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, inputs):
        return self.layers(inputs)


def _request(update, seed):
    record_ids, subject_hashes = keys("u", len(update))
    return registry.UpdateRequest(task=ClassificationTask(10), update=update, update_record_ids=record_ids,
                                  update_subject_hashes=subject_hashes, recipe=RECIPE, update_epochs=2, seed=seed)


def _model():
    torch.manual_seed(0)
    return _DropoutNet()


def test_same_seed_same_weights_with_dropout_different_seed_different_weights():
    update = blobs(65, 1)  # 65 = 2 * 32 + 1: the last batch would hold one example
    model = _model()
    torch.manual_seed(123)  # the caller's global RNG state must neither matter nor be changed
    state = torch.random.get_rng_state()
    first = registry.run("finetune", model, _request(update, seed=4)).model
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)
    second = registry.run("finetune", model, _request(update, seed=4)).model
    third = registry.run("finetune", model, _request(update, seed=5)).model
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(first.layers[0].weight, third.layers[0].weight)


def test_a_last_batch_of_one_joins_the_batch_before_it():
    sizes = [len(index) for index in batch_slices(65, 32)]
    assert sizes == [32, 33]
    assert [len(index) for index in batch_slices(64, 32)] == [32, 32]
    assert [len(index) for index in batch_slices(1, 32)] == [1]
