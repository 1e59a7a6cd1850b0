"""Tests for sst_lab.evaluate.stats: against scipy and closed forms, plus the safety-tax rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from sst_lab.evaluate import stats as S


def outcomes(k: int, n: int) -> np.ndarray:
    """n binary outcomes, the first k of them 1 (so two such arrays are nested, as in a study
    where the candidate refuses everything the reference refused and a few more)."""
    a = np.zeros(n)
    a[:k] = 1
    return a


def assert_all_finite(d: dict) -> None:
    for key, value in d.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float):
                assert math.isfinite(v), key


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize("k,n,low,high", [  # Newcombe (1998), Stat Med 17:857, Table I, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_published_values(k, n, low, high):
    lo, hi = S.wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize("k,n,conf",
                         [(3, 10, 0.95), (82, 2000, 0.95), (40, 40, 0.9), (7, 50, 0.99)])
def test_wilson_inverts_the_score_test(k, n, conf):
    """Each interior bound p solves |k/n - p| = z * sqrt(p (1 - p) / n) (definition of Wilson)."""
    z = sps.norm.ppf(0.5 + conf / 2)
    for p in S.wilson_interval(k, n, conf):
        if 0.0 < p < 1.0:
            assert abs(k / n - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-9)


def test_wilson_matches_statsmodels_if_installed():
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    for k, n in [(0, 5), (3, 10), (82, 2000), (40, 40)]:
        expected = proportion.proportion_confint(k, n, alpha=0.05, method="wilson")
        assert S.wilson_interval(k, n) == pytest.approx(expected, abs=1e-12)


def test_wilson_rejects_bad_input():
    with pytest.raises(ValueError, match="n=0"):
        S.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k"):
        S.wilson_interval(5, 4)


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_matches_scipy_binomtest():
    rng = np.random.default_rng(0)
    for n, flip in [(20, 0.1), (200, 0.05), (2000, 0.01), (40, 0.5)]:
        ref = rng.random(n) < 0.4
        cand = np.where(rng.random(n) < flip, ~ref, ref)
        res = S.mcnemar_exact(ref, cand)
        assert res.b == int(np.sum(ref & ~cand)) and res.c == int(np.sum(~ref & cand))
        if res.b + res.c:
            assert res.p_value == pytest.approx(sps.binomtest(res.b, res.b + res.c).pvalue,
                                                rel=1e-12)


def test_mcnemar_edge_cases():
    assert S.mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0
    assert S.mcnemar_exact([True] * 5, [False] * 5).to_dict() == {
        "b": 5, "c": 0, "p_value": pytest.approx(2 * 0.5 ** 5)}
    with pytest.raises(ValueError, match="lengths 3 != 2"):
        S.mcnemar_exact([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="binary"):
        S.mcnemar_exact([0.5, 1], [1, 0])


# --------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_covers_true_difference():
    rng = np.random.default_rng(1)
    n, true_diff = 400, 0.1
    ref = rng.random(n)
    cand = ref + true_diff + rng.normal(0, 0.3, n)
    res = S.paired_bootstrap(ref, cand, n_boot=4000, seed=3)
    assert res.ci_low < true_diff < res.ci_high
    assert res.diff == pytest.approx(cand.mean() - ref.mean())
    assert res.p_value < 0.01


def test_paired_bootstrap_coverage_on_binary_data():
    """About 95% of intervals contain the true difference (40 small synthetic studies)."""
    rng = np.random.default_rng(2)
    hits = 0
    for study in range(40):
        ref = rng.random(300) < 0.5
        cand = np.where(rng.random(300) < 0.2, rng.random(300) < 0.6, ref)  # true diff 0.02
        res = S.paired_bootstrap(ref, cand, n_boot=1000, seed=study)
        hits += res.ci_low <= 0.02 <= res.ci_high
    assert hits >= 34


def test_paired_bootstrap_reproducible_by_seed_and_generic_statistic():
    rng = np.random.default_rng(4)
    ref, cand = rng.random(300), rng.random(300)
    a = S.paired_bootstrap(ref, cand, n_boot=500, seed=7)
    assert a == S.paired_bootstrap(ref, cand, n_boot=500, seed=7)
    assert a != S.paired_bootstrap(ref, cand, n_boot=500, seed=8)
    med = S.paired_bootstrap(ref, cand, n_boot=300, seed=7, statistic=np.median)
    assert med.diff == pytest.approx(np.median(cand) - np.median(ref))
    assert med.ci_low <= med.diff <= med.ci_high and 0 < med.p_value <= 1
    json.dumps(a.to_dict())


def test_permutation_p_agrees_with_mcnemar_on_binary_data():
    ref = outcomes(10, 200)
    cand = ref.copy()
    cand[10:22] = 1  # 12 gained
    cand[0:3] = 0  # 3 lost
    boot = S.paired_bootstrap(ref, cand, n_boot=20000, seed=0)
    assert boot.p_value == pytest.approx(S.mcnemar_exact(ref, cand).p_value, abs=0.01)
    assert S.paired_bootstrap(ref, ref, n_boot=100).p_value == 1.0


# --------------------------------------------------------------------------- seeds and power


def test_t_interval_matches_scipy():
    values = [0.61, 0.64, 0.58, 0.66]
    mean, std, n, low, high = S.t_interval(values)
    exp_low, exp_high = sps.t.interval(0.95, df=3, loc=np.mean(values),
                                       scale=sps.sem(values))
    assert mean == pytest.approx(np.mean(values)) and n == 4
    assert std == pytest.approx(np.std(values, ddof=1))
    assert (low, high) == (pytest.approx(exp_low), pytest.approx(exp_high))
    assert S.t_interval([0.5, 0.5]).to_dict()["low"] == 0.5
    with pytest.raises(ValueError, match="at least two seeds"):
        S.t_interval([0.5])


def test_paired_summary_treats_round_off_as_constant():
    """0.62-0.52, 0.71-0.61, 0.55-0.45 are 0.1 up to round-off: no p = 3.5e-32 from a 3e-17 std."""
    from sst_lab.tracking.aggregation import paired_summary

    diffs = [0.62 - 0.52, 0.71 - 0.61, 0.55 - 0.45]
    assert np.std(diffs, ddof=1) > 0  # the round-off the old code mistook for a spread
    s = paired_summary(diffs)
    assert s.constant and s.p_value is None and s.std == 0.0
    assert s.ci_low == s.ci_high == pytest.approx(0.1) and s.n == 3
    assert "p_value" not in s.as_metrics("x")
    exact = paired_summary([0.0, 0.0])
    assert exact.constant and exact.p_value is None and exact.mean == 0.0
    real = paired_summary([0.1, 0.1 + 1e-6, 0.1 - 1e-6])  # a tiny but real spread keeps its test
    assert not real.constant and real.p_value == pytest.approx(sps.ttest_1samp(
        [0.1, 0.1 + 1e-6, 0.1 - 1e-6], 0.0).pvalue)


def test_mde_inverts_sample_size_formulas():
    za, zb = sps.norm.ppf(0.975), sps.norm.ppf(0.8)
    p1, delta = 0.2, 0.05
    p2, pbar = p1 + delta, p1 + delta / 2
    n = ((za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2)))
         / delta) ** 2  # Fleiss, two proportions
    assert S.minimum_detectable_effect(math.ceil(n), p1) == pytest.approx(delta, abs=2e-4)
    psi = 0.1  # Connor (1987), McNemar
    n_paired = ((za * math.sqrt(psi) + zb * math.sqrt(psi - delta ** 2)) / delta) ** 2
    assert S.minimum_detectable_effect(math.ceil(n_paired), p1, paired_discordance=psi) == \
        pytest.approx(delta, abs=2e-4)


def test_mde_shrinks_with_n_and_reports_the_failed_study():
    mde = S.minimum_detectable_effect(2000, 82 / 2000)
    assert 0.01 < mde < 0.03 and mde > (84 - 82) / 2000
    assert S.minimum_detectable_effect(8000, 0.041) < mde
    with pytest.raises(ValueError, match="detectable"):
        S.minimum_detectable_effect(10, 0.99)


# --------------------------------------------------------------------------- safety tax

UTILITY_REF = np.r_[np.ones(120), np.zeros(80)]
UTILITY_CAND = np.r_[np.zeros(10), np.ones(110), np.zeros(80)]  # loses 10 of 200 items


@pytest.mark.parametrize("k_ref,k_cand,n", [(82, 84, 2000), (5, 6, 40)])
def test_safety_tax_not_significant(k_ref, k_cand, n):
    res = S.safety_tax(outcomes(k_ref, n), outcomes(k_cand, n), UTILITY_REF, UTILITY_CAND,
                       n_boot=2000)
    assert res.status == "not_significant"
    assert res.safety_gain == pytest.approx((k_cand - k_ref) / n)
    assert res.safety_test == "mcnemar_exact" and res.safety_p_value >= 0.05
    assert res.tax is None and res.tax_ci is None
    assert res.mde_safety is not None and res.mde_safety > res.safety_gain
    assert "not significant" in res.note
    assert_all_finite(res.to_dict())


def test_safety_tax_no_gain_and_identical():
    same = S.safety_tax(outcomes(10, 200), outcomes(10, 200), UTILITY_REF, UTILITY_REF,
                        n_boot=500)
    assert (same.status, same.tax, same.tax_ci, same.identical) == ("no_safety_gain", None, None,
                                                                    True)
    worse = S.safety_tax(outcomes(10, 200), outcomes(8, 200), UTILITY_REF, UTILITY_CAND,
                         n_boot=500)
    assert (worse.status, worse.tax, worse.identical) == ("no_safety_gain", None, False)
    assert_all_finite(worse.to_dict())


def test_safety_tax_defined_for_a_big_gain():
    res = S.safety_tax(outcomes(10, 200), outcomes(150, 200), UTILITY_REF, UTILITY_CAND)
    assert res.status == "defined" and res.safety_p_value < 1e-10
    assert res.tax == pytest.approx((0.6 - 0.55) / (0.75 - 0.05))
    assert res.tax_ci is not None and res.tax_ci[0] < res.tax < res.tax_ci[1]
    assert res.tax_ci_excluded_share == 0.0
    assert res.utility_loss_ci[0] < 0.05 < res.utility_loss_ci[1]
    d = res.to_dict()
    assert_all_finite(d)
    json.dumps(d)
    again = S.safety_tax(outcomes(10, 200), outcomes(150, 200), UTILITY_REF, UTILITY_CAND)
    assert again == res


def test_safety_tax_at_the_utility_floor_is_not_a_zero_tax():
    """Both models score 0 on every utility item: 'tax 0.00' would be a floor effect."""
    res = S.safety_tax(outcomes(10, 200), outcomes(150, 200), np.zeros(100), np.zeros(100))
    assert res.status == "utility_floor" and res.tax is None and res.tax_ci is None
    assert res.safety_p_value < 1e-10 and "no utility loss is measurable" in res.note
    some = np.zeros(100)
    some[:3] = 1.0  # one model scores on 3 items: the loss is measurable again
    assert S.safety_tax(outcomes(10, 200), outcomes(150, 200), np.zeros(100), some).status == "defined"


def test_safety_tax_real_valued_utility_and_checks():
    rng = np.random.default_rng(5)
    u_ref = rng.random(300)
    u_cand = np.clip(u_ref + rng.normal(0.02, 0.05, 300), 0, 1)  # utility improves: tax < 0
    res = S.safety_tax(outcomes(10, 200), outcomes(150, 200), u_ref, u_cand, n_boot=2000)
    assert res.status == "defined" and res.utility_test == "sign_flip_permutation"
    assert res.tax is not None and res.tax < 0 and res.n_utility == 300
    with pytest.raises(ValueError, match="utility_ref and utility_cand"):
        S.safety_tax([1, 0], [1, 1], [0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.safety_tax([1, 0], [1, 1], [2.0, 0.5], [0.5, 0.5])


def test_ratio_ci_refuses_when_gain_often_non_positive():
    num = np.full(1000, 0.1)
    den = np.r_[np.full(900, 0.5), np.full(100, -0.1)]  # 10% of resamples have no gain
    ci, share = S._ratio_ci(num, den, confidence=0.95)
    assert ci is None and share == pytest.approx(0.1)
    ci, share = S._ratio_ci(num, np.r_[np.full(990, 0.5), np.zeros(10)], confidence=0.95)
    assert ci == pytest.approx((0.2, 0.2)) and share == pytest.approx(0.01)


# --------------------------------------------------------------------------- judge calibration


def test_cohen_kappa_published_example_and_undefined_for_one_label():
    """Wikipedia's worked example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> po 0.7, pe 0.5, kappa 0.4."""
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert S.cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    rng = np.random.default_rng(5)
    h = rng.random(300) < 0.4
    j = np.where(rng.random(300) < 0.2, ~h, h)
    low, high = S.kappa_bootstrap_ci(h, j, n_boot=500)
    assert low < S.cohen_kappa(h, j) < high
    assert S.cohen_kappa([1, 1, 1], [1, 1, 1]) is None


def test_rogan_gladen_inverts_misclassification():
    """p_obs = Se*p + (1-Sp)*(1-p) for a true rate p; the correction recovers p, and its interval
    widens when the judge was calibrated on fewer items."""
    se, sp, p = 0.8, 0.9, 0.3
    n = 10_000
    k = round(n * (se * p + (1 - sp) * (1 - p)))
    big = S.rogan_gladen(k, n, 800, 1000, 900, 1000, n_boot=4000)
    assert big.corrected == pytest.approx(p, abs=1e-3) and big.raw == pytest.approx(k / n)
    assert big.ci_low < p < big.ci_high
    small = S.rogan_gladen(k, n, 80, 100, 90, 100, n_boot=4000)
    assert (small.ci_high - small.ci_low) > 2 * (big.ci_high - big.ci_low)
    perfect = S.rogan_gladen(30, 100, 50, 50, 50, 50, n_boot=200)
    assert perfect.corrected == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no better than chance"):
        S.rogan_gladen(30, 100, 25, 50, 25, 50)
    with pytest.raises(ValueError, match="k/n = 5/4"):
        S.rogan_gladen(5, 4, 1, 2, 1, 2)
