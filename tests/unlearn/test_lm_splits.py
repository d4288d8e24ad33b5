"""The fictitious-subjects benchmark's people: four disjoint groups, and no metric on the tune people (issue 9)."""

from __future__ import annotations

import pytest

from unlearn.errors import InvalidDataError
from unlearn.bench.lm_subjects import PeopleSplits, check_no_metric_on_tune, people_splits
from unlearn.lm.fictitious import NEVER_TRAINED_PEOPLE, PEOPLE, load_fictitious_subjects, tune_audit_split
from unlearn.registry import UnlearnRequest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_fictitious_subjects(tmp_path_factory.mktemp("lm-cache"))


def test_train_tune_and_audit_people_are_disjoint_and_cover_everyone(data):
    train, tune, audit = set(data.train_subjects), set(data.tune_subjects), set(data.audit_subjects)
    assert len(train) == PEOPLE - NEVER_TRAINED_PEOPLE and len(tune) + len(audit) == NEVER_TRAINED_PEOPLE
    assert not train & tune and not train & audit and not tune & audit
    assert train | tune | audit == set(range(PEOPLE))
    assert min(len(tune), len(audit)) >= 40  # the statistical power the module docstring counts on


def test_tune_audit_split_is_a_keyed_hash_stable_when_people_are_added():
    tune_small, audit_small = tune_audit_split(range(50))
    tune_big, audit_big = tune_audit_split(range(100))
    assert set(tune_small) <= set(tune_big) and set(audit_small) <= set(audit_big)
    assert tune_audit_split(range(50), key=b"another key") != (tune_small, audit_small)


@pytest.mark.parametrize("seed", range(5))
def test_every_seed_draws_forget_people_among_the_trained_and_keeps_groups_disjoint(data, seed):
    people = people_splits(data, seed)
    assert len(people.forget) == 10 and set(people.forget) <= set(data.train_subjects)
    assert set(people.forget) | set(people.retain) == set(data.train_subjects)
    request = UnlearnRequest(task=data.task, forget=data.examples(people.forget),
                             retain=data.examples(people.retain), tune=data.examples(people.tune))
    check_no_metric_on_tune(request, {"forget": request.forget, "retain": request.retain,
                                      "audit": data.examples(people.audit)})


def test_overlapping_groups_are_refused():
    with pytest.raises(InvalidDataError) as error:
        PeopleSplits(forget=(1, 2), retain=(3,), tune=(4, 5), audit=(5, 6))
    assert error.value.field == "tune/audit"


def test_a_metric_on_tune_people_is_refused(data):
    people = people_splits(data, 0)
    tune = data.examples(people.tune)
    request = UnlearnRequest(task=data.task, forget=data.examples(people.forget), tune=tune)
    with pytest.raises(InvalidDataError) as error:  # scoring the tune people as the audit reference
        check_no_metric_on_tune(request, {"forget": request.forget, "audit": tune})
    assert error.value.field == "audit"
    leaky = UnlearnRequest(task=data.task, forget=data.examples(people.forget),
                           tune=data.examples(people.tune[:3] + people.audit[:2]))
    with pytest.raises(InvalidDataError):  # a method that saw audit people
        check_no_metric_on_tune(leaky, {"audit": data.examples(people.audit)})
