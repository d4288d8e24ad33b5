"""Continual metrics on a hand-computed R matrix and stability traces."""

from __future__ import annotations

import pytest

from continual.metrics import DEFINITIONS, ProbeRecord, UpdateTrace, acc, bwt, forgetting, min_acc, summary, wc_acc

R = [[0.9, 0.0, 0.0],
     [0.8, 0.95, 0.0],
     [0.7, 0.85, 1.0]]


def test_acc_bwt_forgetting_by_hand():
    assert acc(R) == pytest.approx((0.7 + 0.85 + 1.0) / 3)
    assert bwt(R) == pytest.approx(((0.7 - 0.9) + (0.85 - 0.95)) / 2)  # -0.15
    # f_0 = max(0.9, 0.8) - 0.7 = 0.2; f_1 = max(0.0, 0.95) - 0.85 = 0.1
    assert forgetting(R) == pytest.approx(0.15)


def _trace(update, before, during):
    return UpdateTrace(update, ProbeRecord(0, {}, before),
                       [ProbeRecord(step, per_task, pooled) for step, per_task, pooled in during])


def test_min_acc_wc_acc_and_stability_gap_by_hand():
    traces = [_trace(1, 0.9, [(2, {0: 0.6}, 0.6), (4, {0: 0.85}, 0.85)]),
              _trace(2, 0.875, [(2, {0: 0.75, 1: 0.5}, 0.7), (4, {0: 0.7, 1: 0.85}, 0.8)])]
    # task 0: minimum over updates 1 and 2 (probes and R rows 1, 2) = 0.6; task 1: over update 2 = 0.5
    assert min_acc(R, traces) == pytest.approx((0.6 + 0.5) / 2)
    assert wc_acc(R, 0.55) == pytest.approx(1.0 / 3 + (2 / 3) * 0.55)
    result = summary(R, traces)
    assert result["stability_gaps"] == pytest.approx([0.9 - 0.6, 0.875 - 0.7])
    assert result["stability_gap"] == pytest.approx(0.3)
    assert set(DEFINITIONS) >= {"r_matrix", "acc", "bwt", "forgetting", "min_acc", "wc_acc", "stability_gap"}


def test_without_traces_the_stability_metrics_are_null_not_made_up():
    result = summary(R, None)
    assert result["min_acc"] is None and result["stability_gap"] is None and result["acc"] == acc(R)
