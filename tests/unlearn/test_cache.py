"""The package's one model cache: keyed by what determines the weights, atomic entries, mismatches refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tests.unlearn.helpers import FEATURES, NUM_CLASSES, RECIPE, blobs, factory
from unlearn.cache import TRAINING_CODE_VERSION, ModelCache, state_dict_codec
from unlearn.errors import CacheMismatchError
from unlearn.models import tiny_mlp
from unlearn.tasks import ClassificationTask

TASK = ClassificationTask(NUM_CLASSES)
SHORT = replace(RECIPE, epochs=2)


def test_trained_model_round_trips_and_the_recorded_seconds_are_labelled_informational(tmp_path):
    data = blobs(64, seed=1)
    cache = ModelCache(tmp_path)
    built = cache.trained("tiny", TASK, factory, data, SHORT, torch.device("cpu"))
    read = cache.trained("tiny", TASK, factory, data, SHORT, torch.device("cpu"))
    assert not built.hit and read.hit and built.path == read.path
    assert all(torch.equal(a, b) for a, b in zip(built.model.state_dict().values(), read.model.state_dict().values()))
    meta = json.loads((read.path / "meta.json").read_text())
    assert meta["training_code_version"] == TRAINING_CODE_VERSION and "never divide" in meta["train_seconds_note"]
    assert not list(tmp_path.glob("models/.*"))  # no staging directory left behind


def test_key_covers_recipe_data_namespace_and_spec(tmp_path):
    cache, data = ModelCache(tmp_path), blobs(64, seed=1)
    base = cache.entry("tiny", "original", {"recipe": 1}, data.digest())
    assert base != cache.entry("tiny", "original", {"recipe": 2}, data.digest())
    assert base != cache.entry("other", "original", {"recipe": 1}, data.digest())
    assert base != cache.entry("tiny", "retrained", {"recipe": 1}, data.digest())
    assert base != cache.entry("tiny", "original", {"recipe": 1}, blobs(64, seed=2).digest())


def test_an_entry_that_does_not_fit_the_model_is_refused(tmp_path):
    data = blobs(64, seed=1)
    cache = ModelCache(tmp_path)
    entry = cache.trained("tiny", TASK, factory, data, SHORT, torch.device("cpu"))
    wider = state_dict_codec(lambda: tiny_mlp(0, FEATURES, NUM_CLASSES + 1))
    with pytest.raises(CacheMismatchError):
        cache.get_or_build("tiny", "original", {"recipe": json.loads((entry.path / "meta.json").read_text())["spec"]
                                                ["recipe"]}, data.digest(), lambda: None, wider, torch.device("cpu"))


def test_an_entry_records_the_thread_count_it_was_trained_with_and_a_reader_sees_that_one(tmp_path):
    data, threads = blobs(64, seed=1), torch.get_num_threads()
    cache = ModelCache(tmp_path)
    try:
        torch.set_num_threads(1)
        built = cache.trained("tiny", TASK, factory, data, SHORT, torch.device("cpu"))
        torch.set_num_threads(2)
        read = cache.trained("tiny", TASK, factory, data, SHORT, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert not built.hit and read.hit
    assert built.meta["torch_threads"] == 1 and read.meta["torch_threads"] == 1  # the build's, not the reader's
