"""The two-sided membership test and the tune/audit split, pinned on hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from unlearn.errors import InvalidDataError
from unlearn.membership import CONFIDENCE_Z, loss_auc, membership_test, null_auc_sd
from unlearn.splits import BENCH_SPLIT_KEY, audit_mask, is_audit


def test_auc_counts_pairs_where_the_forget_loss_is_lower_with_ties_half():
    # forget {1, 3} vs reference {2, 3}: pairs (1<2) (1<3) (3>2) (3=3) -> (1 + 1 + 0 + 0.5) / 4
    assert loss_auc(np.array([1.0, 3.0]), np.array([2.0, 3.0])) == pytest.approx(2.5 / 4)
    assert loss_auc(np.array([0.0, 0.1]), np.array([5.0, 6.0, 7.0])) == 1.0  # members: lower loss
    assert loss_auc(np.array([9.0]), np.array([5.0, 6.0])) == 0.0  # over-forgotten: higher loss


def test_auc_equals_the_rank_sum_u_statistic_exactly_ties_included():
    # The AUC is counted against the sorted reference; it must be the Mann-Whitney U of the pooled ranks
    # (the form it replaced), to the last bit, on rounded losses full of ties and on continuous ones.
    generator = np.random.default_rng(7)
    for case in range(200):
        forget = generator.gamma(1.0, 1.0, size=int(generator.integers(1, 30)))
        reference = generator.gamma(1.2, 1.0, size=int(generator.integers(1, 300)))
        if case % 2:
            forget, reference = np.round(forget, 1), np.round(reference, 1)
        ranks = stats.rankdata(np.concatenate([-forget, -reference]))
        u = ranks[:len(forget)].sum() - len(forget) * (len(forget) + 1) / 2
        assert loss_auc(forget, reference) == u / (len(forget) * len(reference))
        mann_whitney = stats.mannwhitneyu(reference, forget, alternative="two-sided").statistic
        assert loss_auc(forget, reference) == pytest.approx(mann_whitney / (len(forget) * len(reference)))


def test_null_sd_is_the_mann_whitney_formula():
    assert null_auc_sd(6, 90) == pytest.approx(math.sqrt(97 / (12 * 6 * 90)))


def test_memorised_records_fail_and_say_under():
    result = membership_test(np.full(20, 0.01) + np.arange(20) * 1e-4, np.linspace(0.5, 5.0, 90))
    assert result.auc == 1.0 and result.direction == "under"
    assert result.ks_p_value < 1e-10
    assert not result.passes(0.005, 0.1)


def test_over_forgotten_records_fail_and_say_over():
    result = membership_test(np.linspace(50.0, 60.0, 20), np.linspace(0.5, 5.0, 90))
    assert result.auc == 0.0 and result.direction == "over"
    assert not result.passes(0.005, 0.1)


def test_auc_band_widens_with_the_null_noise_of_small_sets():
    # 5 forget records, AUC 0.76: outside a bare 0.1 band, inside 0.1 + z * sd0 (sd0 = 0.134 for 5 vs 90)
    reference = np.arange(90, dtype=float)
    forget = np.array([10.5, 15.5, 20.5, 30.5, 30.6])
    result = membership_test(forget, reference)
    assert result.auc == pytest.approx(1 - np.mean([10.5, 15.5, 20.5, 30.5, 30.6]) / 90, abs=0.01)
    assert abs(result.auc - 0.5) > 0.1
    assert result.auc_slack(0.1) == pytest.approx(0.1 + CONFIDENCE_Z * null_auc_sd(5, 90))
    assert result.auc_passes(0.1)


def test_same_distribution_passes_at_least_99_percent_of_the_time():
    rng = np.random.default_rng(0)
    passed = [membership_test(rng.exponential(size=n), rng.exponential(size=80)).passes(0.005, 0.1)
              for n in (5, 20, 60) for _ in range(300)]
    assert np.mean(passed) >= 0.99


def test_empty_or_non_finite_losses_are_refused():
    with pytest.raises(InvalidDataError):
        membership_test(np.array([]), np.array([1.0]))
    with pytest.raises(InvalidDataError):
        membership_test(np.array([np.nan]), np.array([1.0]))


def test_split_is_keyed_stable_and_about_half():
    ids = [f"record-{i}" for i in range(2000)]
    mask = audit_mask(ids, BENCH_SPLIT_KEY)
    assert 0.45 < mask.mean() < 0.55
    assert (audit_mask(ids[::-1], BENCH_SPLIT_KEY) == mask[::-1]).all()  # per record, not per position
    assert (audit_mask(ids, b"another key") != mask).any()
    assert is_audit("record-7", BENCH_SPLIT_KEY) == bool(mask[7])


def test_the_unwrapped_ks_test_is_scipys():
    from unlearn.membership import _ks_2samp

    rng = np.random.default_rng(3)
    for forget_size in (1, 3, 40):
        forget, reference = rng.normal(size=forget_size), rng.normal(0.3, 1.0, size=150)
        ours = _ks_2samp(forget, reference, alternative="two-sided", method="auto")
        theirs = stats.ks_2samp(forget, reference, alternative="two-sided", method="auto")
        assert (ours.statistic, ours.pvalue) == (theirs.statistic, theirs.pvalue)
