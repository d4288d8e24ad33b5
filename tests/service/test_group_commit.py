"""Leader/follower group commit (:mod:`service.group_commit`): every caller gets its own result; callers that
arrive while a commit is in flight share the next one; a batch that fails as a whole is retried one item per
commit, so only the item at fault fails."""

from __future__ import annotations

import threading

import pytest

from service.group_commit import GroupCommit


class _Poisoned(Exception):
    pass


def test_callers_arriving_during_a_commit_share_the_next_and_each_gets_its_own_result():
    first_commit_entered, release_first = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def commit(batch: list[int]) -> list[int]:
        batches.append(list(batch))
        if len(batches) == 1:
            first_commit_entered.set()
            release_first.wait(10)
        return [item * 10 for item in batch]

    group = GroupCommit(commit)
    results: dict[int, int] = {}
    leader = threading.Thread(target=lambda: results.update({0: group.submit(0)}))
    leader.start()
    assert first_commit_entered.wait(10)
    followers = [threading.Thread(target=lambda i=i: results.update({i: group.submit(i)})) for i in range(1, 6)]
    for thread in followers:
        thread.start()
    while len(group._queue) < 5:  # every follower queued behind the commit in flight
        threading.Event().wait(0.01)
    release_first.set()
    for thread in [leader, *followers]:
        thread.join(10)
    assert results == {i: i * 10 for i in range(6)}
    assert batches[0] == [0] and sorted(batches[1]) == [1, 2, 3, 4, 5], "the five waiting callers: one commit"


def test_a_failing_batch_is_retried_one_item_at_a_time_and_only_the_bad_item_fails():
    first_commit_entered, release_first = threading.Event(), threading.Event()
    commits: list[list[str]] = []

    def commit(batch: list[str]) -> list[str]:
        commits.append(sorted(batch))
        if batch == ["first"]:
            first_commit_entered.set()
            release_first.wait(10)
        if "bad" in batch:
            raise _Poisoned("the transaction failed")
        return [f"stored {item}" for item in batch]

    group = GroupCommit(commit)
    outcomes: dict[str, object] = {}
    threads = [threading.Thread(target=lambda item=item: outcomes.update({item: _outcome(group, item)}))
               for item in ("first", "a", "bad", "b")]
    threads[0].start()
    assert first_commit_entered.wait(10)
    for thread in threads[1:]:
        thread.start()
    while len(group._queue) < 3:  # a, bad and b wait for the commit in flight: they form the next batch
        threading.Event().wait(0.01)
    release_first.set()
    for thread in threads:
        thread.join(10)
    assert outcomes == {"first": "stored first", "a": "stored a", "b": "stored b", "bad": outcomes["bad"]}
    assert isinstance(outcomes["bad"], _Poisoned)
    assert commits[1] == ["a", "b", "bad"], "the three waiting items were first committed together"
    assert sorted(commits[2:]) == [["a"], ["b"], ["bad"]], "then one per commit"


def _outcome(group: GroupCommit, item: str):
    try:
        return group.submit(item)
    except _Poisoned as error:
        return error


def test_a_caller_s_own_refusal_is_raised_to_it_alone():
    group = GroupCommit(lambda batch: [ValueError(item) if item == "refused" else item for item in batch])
    assert group.submit("fine") == "fine"
    with pytest.raises(ValueError):
        group.submit("refused")
