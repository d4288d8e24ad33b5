"""The training-set importance is computed once per model version and then served from cache."""

import torch

from tests.unlearn.helpers import class_problem
from unlearn.importance import ImportanceCache, TrainImportance, estimate_importance


def test_cache_round_trip_and_hit(tmp_path):
    problem = class_problem()
    source = TrainImportance(problem.task, problem.train, ImportanceCache(tmp_path))
    first = source.get(problem.model, 64)
    assert not source.last_hit
    fresh = TrainImportance(problem.task, problem.train, ImportanceCache(tmp_path))  # a new process
    second = fresh.get(problem.model, 64)
    assert fresh.last_hit
    for name in first:
        torch.testing.assert_close(first[name], second[name])
    direct = estimate_importance(problem.task, problem.model, problem.train, 64)
    for name in first:
        torch.testing.assert_close(first[name], direct[name])


def test_key_depends_on_weights_batch_size_and_variant(tmp_path):
    problem = class_problem()
    source = TrainImportance(problem.task, problem.train, ImportanceCache(tmp_path))
    source.get(problem.model, 64)
    source.get(problem.model, 32)
    source.get(problem.model, 64, "label_free")
    changed = type(problem.model)(16, 10)
    changed.load_state_dict(problem.model.state_dict())
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    source.get(changed, 64)
    assert len(list(tmp_path.glob("importance-*.safetensors"))) == 4
