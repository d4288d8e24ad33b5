"""The replay buffer: reservoir filling, purge (no row or logit of a purged key survives, in memory or on disk),
persistence with integrity checks, stale logits after a purge."""

from __future__ import annotations

import json

import pytest
import torch

from continual import registry
from continual.buffer import MANIFEST_FILE, TENSORS_FILE, ReplayBuffer
from continual.errors import BufferIntegrityError, ErasedDataError
from tests.continual.helpers import class_problem
from unlearn.data import ExampleSet, classification_examples

MARK = 777.0  # a value only the purged subject's rows carry


def _rows(count: int, start: int = 0) -> ExampleSet:
    inputs = torch.arange(start, start + count, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return classification_examples(inputs, torch.arange(start, start + count) % 4)


def _filled(capacity: int = 8, count: int = 6) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, seed=0)
    examples = _rows(count)
    logits = examples["inputs"][:, :2] * 10
    buffer.offer(examples, logits, [f"r{i}" for i in range(count)], [f"s{i % 3}" for i in range(count)])
    return buffer


def test_reservoir_respects_capacity_counts_offers_and_is_deterministic():
    first, second = ReplayBuffer(5, seed=1), ReplayBuffer(5, seed=1)
    for buffer in (first, second):
        for start in range(0, 40, 10):
            examples = _rows(10, start)
            buffer.offer(examples, examples["inputs"][:, :2], [f"r{i}" for i in range(start, start + 10)],
                         [f"s{i}" for i in range(start, start + 10)])
    assert len(first) == 5 and first.seen == 40
    assert first.record_ids == second.record_ids
    assert torch.equal(first.fields["inputs"], second.fields["inputs"])
    for row, record in enumerate(first.record_ids):  # every row still matches its key and its logits
        value = float(record[1:])
        assert first.fields["inputs"][row, 0] == value and first.logits[row, 0] == value


def test_reoffering_a_buffered_record_refreshes_it_in_place():
    buffer = _filled()
    examples = _rows(1, 2)
    buffer.offer(examples, torch.tensor([[-1.0, -1.0]]), ["r2"], ["s2"])
    assert len(buffer) == 6 and buffer.seen == 6
    assert buffer.logits[buffer.record_ids.index("r2")].tolist() == [-1.0, -1.0]


def test_purge_removes_rows_and_logits_of_records_subjects_and_classes():
    buffer = _filled()
    removed = buffer.purge(subject_hashes=["s0"])  # rows 0 and 3
    assert removed == 2 and "s0" not in buffer.subject_hashes
    assert sorted(buffer.record_ids) == ["r1", "r2", "r4", "r5"]
    assert set(buffer.fields["inputs"][:, 0].tolist()) == {1.0, 2.0, 4.0, 5.0}
    assert set(buffer.logits[:, 0].tolist()) == {10.0, 20.0, 40.0, 50.0}
    assert buffer.logits_stale
    assert buffer.purge(record_ids=["r5"]) == 1
    assert buffer.purge(classes=[1]) == 1  # r1 (label 1)
    assert sorted(buffer.record_ids) == ["r2", "r4"]


def test_no_row_or_logit_of_a_purged_subject_survives_saving_and_reloading(tmp_path):
    buffer = _filled()
    marked = _rows(2, 100)
    marked = ExampleSet({"inputs": torch.full_like(marked["inputs"], MARK), "labels": marked["labels"]})
    buffer.offer(marked, torch.full((2, 2), MARK), ["secret-1", "secret-2"], ["erased-subject"] * 2)
    buffer.save(tmp_path)
    assert b"erased-subject" in (tmp_path / MANIFEST_FILE).read_bytes()

    buffer.purge(subject_hashes=["erased-subject"])
    buffer.save(tmp_path)
    reloaded = ReplayBuffer.load(tmp_path)
    assert "erased-subject" not in reloaded.subject_hashes and "secret-1" not in reloaded.record_ids
    assert not bool((reloaded.fields["inputs"] == MARK).any()) and not bool((reloaded.logits == MARK).any())
    assert b"erased-subject" not in (tmp_path / MANIFEST_FILE).read_bytes()
    assert torch.tensor([MARK]).numpy().tobytes() not in (tmp_path / TENSORS_FILE).read_bytes()
    assert reloaded.logits_stale and reloaded.seen == buffer.seen and reloaded.record_ids == buffer.record_ids
    assert not list(tmp_path.glob("*.partial"))


def test_a_reloaded_buffer_continues_the_reservoir_exactly(tmp_path):
    saved, kept = _filled(capacity=4), _filled(capacity=4)
    saved.save(tmp_path)
    reloaded = ReplayBuffer.load(tmp_path)
    examples = _rows(10, 50)
    for buffer in (reloaded, kept):
        buffer.offer(examples, examples["inputs"][:, :2], [f"n{i}" for i in range(10)], [f"t{i}" for i in range(10)])
    assert reloaded.record_ids == kept.record_ids and torch.equal(reloaded.logits, kept.logits)


@pytest.mark.parametrize("damage", ["tensors", "manifest_ids", "manifest_rows", "missing"])
def test_load_refuses_a_buffer_that_does_not_match_its_manifest(tmp_path, damage):
    _filled().save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    if damage == "tensors":
        data = bytearray((tmp_path / TENSORS_FILE).read_bytes())
        data[-1] ^= 0xFF
        (tmp_path / TENSORS_FILE).write_bytes(bytes(data))
    elif damage == "manifest_ids":
        manifest["record_ids"][1] = manifest["record_ids"][0]
        (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif damage == "manifest_rows":
        manifest["rows"] = 5
        (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    else:
        (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(BufferIntegrityError):
        ReplayBuffer.load(tmp_path)


def test_sequence_rows_of_different_widths_are_padded():
    buffer = ReplayBuffer(10)
    for width, count in ((3, 2), (5, 1)):
        examples = ExampleSet({"input_ids": torch.ones(count, width, dtype=torch.long),
                               "attention_mask": torch.ones(count, width, dtype=torch.long),
                               "answer_mask": torch.ones(count, width, dtype=torch.long)})
        buffer.offer(examples, torch.ones(count, width, 4), [f"w{width}-{i}" for i in range(count)], ["s"] * count)
    assert buffer.fields["input_ids"].shape == (3, 5) and buffer.logits.shape == (3, 5, 4)
    assert buffer.fields["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]


def test_replay_refreshes_stale_logits_with_the_current_model_and_leaves_the_callers_buffer():
    problem = class_problem()
    buffer = problem.buffer()
    buffer.purge(subject_hashes=["retain-subject-0"])
    before = buffer.logits.clone()
    result = registry.run("replay", problem.model, problem.request(buffer=buffer))
    assert result.details["logits_refreshed"] and not result.buffer.logits_stale
    assert buffer.logits_stale and torch.equal(buffer.logits, before)  # the caller's buffer is untouched


def test_an_unpurged_buffer_holding_an_erased_subject_is_refused():
    problem = class_problem()
    buffer = problem.buffer()
    request = problem.request(buffer=buffer, erased_subject_hashes=frozenset({buffer.subject_hashes[3]}))
    with pytest.raises(ErasedDataError) as error:
        registry.run("replay", problem.model, request)
    assert error.value.field == "buffer.subject_hashes" and error.value.index == 3
