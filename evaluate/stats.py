"""Honest statistics for paired evaluation results (numpy/scipy only).

Every evaluation in sst-lab compares a candidate model with a reference model on the *same*
items, so the tests here are paired:

* :func:`wilson_interval` - Wilson score interval for one proportion (k successes of n).
* :func:`mcnemar_exact` - exact two-sided McNemar test on per-item binary outcomes
  (binomial test of the discordant pairs, p = 1 when there are none).
* :func:`paired_bootstrap` - percentile bootstrap CI of ``statistic(cand) - statistic(ref)``
  with items resampled jointly, plus a two-sided p-value from a **paired sign-flip permutation
  test** (each item's (ref, cand) pair is swapped with probability 1/2; on binary outcomes this
  is a Monte-Carlo version of the exact McNemar test). p = (1 + #{|T*| >= |T|}) / (1 + n_boot),
  so it is never 0. The CI and the p-value come from two different resampling schemes and can,
  in borderline cases, disagree about "significant at alpha"; the p-value is the test, the CI
  describes the size of the effect.
* :func:`t_interval` - Student-t interval of a mean over seeds.
* :func:`minimum_detectable_effect` - the smallest absolute difference in a proportion that a
  two-sided test at ``alpha`` detects with ``power``: the two-proportion normal approximation
  (Fleiss, no continuity correction) or, given an assumed discordance rate, Connor's (1987)
  approximation for McNemar's paired test.
* :func:`safety_tax` - utility lost per unit of safety gained, defined only when the safety gain
  is significantly positive (see the function for the exact rules).

Results are frozen dataclasses with ``to_dict()``. Nothing returns ``inf`` or ``NaN``: a
non-finite result raises ``ArithmeticError`` (an internal bug), bad input raises ``ValueError``
naming the argument.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from scipy import optimize
from scipy import stats as sps

Values = Sequence[float] | Sequence[bool] | np.ndarray
Statistic = Callable[..., Any]

_CHUNK_ELEMENTS = 2_000_000  # resampling matrices are built in chunks of about this many cells
_MAX_GROUPS = 64  # fast multinomial/binomial path for the mean when values take few distinct values
_TOL = 1e-12


class _AsDict:
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ArithmeticError(f"{name} is not finite ({value!r}): a bug in sst_lab.evaluate.stats")
    return value


def _check_confidence(confidence: float, name: str = "confidence") -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {confidence!r}")


def _as_array(name: str, values: Values, *, unit: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    if unit and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must lie in [0, 1] (per-item scores)")
    return arr


def _pair(ref: Values, cand: Values, names: tuple[str, str] = ("ref", "cand"),
          *, unit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    r, c = _as_array(names[0], ref, unit=unit), _as_array(names[1], cand, unit=unit)
    if r.size != c.size:
        raise ValueError(f"{names[0]} and {names[1]} must score the same items: "
                         f"lengths {r.size} != {c.size}")
    return r, c


def _is_binary(arr: np.ndarray) -> bool:
    return bool(np.all((arr == 0.0) | (arr == 1.0)))


# --------------------------------------------------------------------------- proportions


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials."""
    if int(n) != n or n <= 0:
        raise ValueError(f"wilson_interval needs a positive integer n, got n={n!r}")
    if int(k) != k or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs an integer 0 <= k <= n, got k={k!r}, n={n!r}")
    _check_confidence(confidence)
    z = float(sps.norm.ppf(0.5 + confidence / 2.0))
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return _finite("wilson low", low), _finite("wilson high", high)


@dataclass(frozen=True)
class McNemarResult(_AsDict):
    b: int  # items the reference got right (1) and the candidate wrong (0)
    c: int  # items the reference got wrong (0) and the candidate right (1)
    p_value: float


def _mcnemar_p(b: int, c: int) -> float:
    m = b + c
    if m == 0:
        return 1.0
    return _finite("McNemar p", min(1.0, 2.0 * float(sps.binom.cdf(min(b, c), m, 0.5))))


def mcnemar_exact(ref: Sequence[bool], cand: Sequence[bool]) -> McNemarResult:
    """Exact two-sided McNemar test for paired binary outcomes on the same items."""
    r, c = _pair(ref, cand)
    if not (_is_binary(r) and _is_binary(c)):
        raise ValueError("mcnemar_exact needs binary (0/1 or bool) outcomes in ref and cand")
    b = int(np.count_nonzero((r == 1) & (c == 0)))
    cc = int(np.count_nonzero((r == 0) & (c == 1)))
    return McNemarResult(b=b, c=cc, p_value=_mcnemar_p(b, cc))


# --------------------------------------------------------------------------- paired resampling


def _bootstrap_reps(ref: np.ndarray, cand: np.ndarray, n_boot: int,
                    rng: np.random.Generator, statistic: Statistic) -> np.ndarray:
    """``statistic(cand*) - statistic(ref*)`` over ``n_boot`` joint resamples of the items."""
    n = ref.size
    if statistic is np.mean:
        d = cand - ref
        values, counts = np.unique(d, return_counts=True)
        if values.size <= _MAX_GROUPS:  # counts of each distinct difference are multinomial
            return rng.multinomial(n, counts / n, size=n_boot) @ values / n
    out = np.empty(n_boot)
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(n_boot, start + step) - start, n))
        if statistic is np.mean:
            out[start:start + idx.shape[0]] = (cand - ref)[idx].mean(axis=1)
        else:
            out[start:start + idx.shape[0]] = (statistic(cand[idx], axis=1)
                                               - statistic(ref[idx], axis=1))
    return out


def _sign_flip_p(ref: np.ndarray, cand: np.ndarray, observed: float, n_boot: int,
                 rng: np.random.Generator, statistic: Statistic) -> float:
    """Two-sided paired permutation p-value: swap each item's (ref, cand) with probability 1/2."""
    n = ref.size
    if statistic is np.mean:
        d = (cand - ref)[cand != ref]
        if d.size == 0:
            return 1.0
        values, counts = np.unique(d, return_counts=True)
        if values.size <= _MAX_GROUPS:  # number of un-flipped items per distinct value is binomial
            plus = rng.binomial(counts, 0.5, size=(n_boot, values.size))
            t = (2 * plus - counts) @ values / n
        else:
            t = np.concatenate([rng.choice([-1.0, 1.0], size=(k, d.size)) @ d / n
                                for k in _chunks(n_boot, d.size)])
    else:
        parts = []
        for k in _chunks(n_boot, n):
            swap = rng.random((k, n)) < 0.5
            a, b = np.where(swap, ref, cand), np.where(swap, cand, ref)
            parts.append(statistic(a, axis=1) - statistic(b, axis=1))
        t = np.concatenate(parts)
    exceed = int(np.count_nonzero(np.abs(t) >= abs(observed) - _TOL))
    return (1 + exceed) / (1 + n_boot)


def _chunks(total: int, width: int) -> Iterator[int]:
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, total, step):
        yield min(total, start + step) - start


def _percentile_ci(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    a = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [a, 1.0 - a])
    return _finite("ci_low", low), _finite("ci_high", high)


@dataclass(frozen=True)
class BootstrapResult(_AsDict):
    diff: float  # statistic(cand) - statistic(ref)
    ci_low: float
    ci_high: float
    p_value: float  # paired sign-flip permutation test, two-sided
    n: int
    n_boot: int
    confidence: float
    seed: int
    ci_method: str = "percentile bootstrap, items resampled jointly"
    p_method: str = "paired sign-flip permutation"


def paired_bootstrap(ref: Values, cand: Values, *, n_boot: int = 10_000, seed: int = 0,
                     confidence: float = 0.95, statistic: Statistic = np.mean) -> BootstrapResult:
    """Paired bootstrap CI and permutation p-value for ``statistic(cand) - statistic(ref)``.

    ``ref``/``cand`` are per-item scores on the same items (binary or real-valued).
    ``statistic`` is a numpy-style reduction accepting ``axis=`` (``np.mean``, ``np.median``).
    """
    r, c = _pair(ref, cand)
    _check_confidence(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    boot_rng, perm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    diff = _finite("diff", statistic(c) - statistic(r))
    low, high = _percentile_ci(_bootstrap_reps(r, c, n_boot, boot_rng, statistic), confidence)
    p = _sign_flip_p(r, c, diff, n_boot, perm_rng, statistic)
    return BootstrapResult(diff=diff, ci_low=low, ci_high=high, p_value=_finite("p_value", p),
                           n=int(r.size), n_boot=int(n_boot), confidence=confidence, seed=seed)


def mean_bootstrap_ci(values: Values, *, n_boot: int = 10_000, seed: int = 0,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-item scores (items resampled with replacement)."""
    arr = _as_array("values", values)
    _check_confidence(confidence)
    if arr.size < 2 or n_boot < 1:
        raise ValueError(f"mean_bootstrap_ci: needs at least 2 values and n_boot >= 1 (got {arr.size}, {n_boot})")
    rng = np.random.default_rng(seed)
    reps = np.concatenate([arr[rng.integers(0, arr.size, size=(k, arr.size))].mean(axis=1)
                           for k in _chunks(n_boot, arr.size)])
    return _percentile_ci(reps, confidence)


# --------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class TInterval(_AsDict):
    mean: float
    std: float  # sample standard deviation, ddof=1
    n: int
    low: float
    high: float
    confidence: float = 0.95

    def __iter__(self) -> Iterator[float | int]:
        """Unpack as ``mean, std, n, low, high``."""
        return iter((self.mean, self.std, self.n, self.low, self.high))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> TInterval:
    """Student-t interval of the mean of per-seed results."""
    _check_confidence(confidence)
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size < 2:
        raise ValueError(f"t_interval: at least two seeds are needed for a spread, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("t_interval: values contain non-finite entries")
    mean, std, n = float(arr.mean()), float(arr.std(ddof=1)), int(arr.size)
    half = float(sps.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * std / math.sqrt(n)
    return TInterval(mean=_finite("mean", mean), std=_finite("std", std), n=n,
                     low=_finite("low", mean - half), high=_finite("high", mean + half),
                     confidence=confidence)


# --------------------------------------------------------------------------- power


def minimum_detectable_effect(n: int, p_ref: float, *, alpha: float = 0.05, power: float = 0.8,
                              paired_discordance: float | None = None) -> float:
    """Smallest increase ``delta`` over ``p_ref`` a two-sided level-``alpha`` test detects.

    Without ``paired_discordance``: two-proportion normal approximation with ``n`` items per arm,
    solving ``sqrt(n)*delta = z_a*sqrt(2*pbar*(1-pbar)) + z_b*sqrt(p1*q1 + p2*q2)``. For paired
    data with few discordant items it is conservative (McNemar is more powerful).
    With ``paired_discordance`` = psi (assumed share of items whose outcome differs between the
    models): Connor (1987), ``sqrt(n)*delta = z_a*sqrt(psi) + z_b*sqrt(psi - delta**2)``.
    For a decrease, call with ``1 - p_ref`` (the variance is symmetric).
    Raises ``ValueError`` when no increase up to ``1 - p_ref`` (or ``psi``) is detectable.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"minimum_detectable_effect needs a positive integer n, got n={n!r}")
    if not 0.0 <= p_ref <= 1.0:
        raise ValueError(f"p_ref must be in [0, 1], got {p_ref!r}")
    _check_confidence(alpha, "alpha")
    _check_confidence(power, "power")
    za, zb = float(sps.norm.ppf(1.0 - alpha / 2.0)), float(sps.norm.ppf(power))
    root_n, high = math.sqrt(n), 1.0 - p_ref

    if paired_discordance is None:
        def gap(d: float) -> float:
            p2 = p_ref + d
            pbar = (p_ref + p2) / 2.0
            need = (za * math.sqrt(2.0 * pbar * (1.0 - pbar))
                    + zb * math.sqrt(p_ref * (1.0 - p_ref) + p2 * (1.0 - p2)))
            return root_n * d - need
    else:
        psi = float(paired_discordance)
        if not 0.0 < psi <= 1.0:
            raise ValueError(f"paired_discordance must be in (0, 1], got {paired_discordance!r}")
        high = min(high, psi)

        def gap(d: float) -> float:
            return root_n * d - (za * math.sqrt(psi) + zb * math.sqrt(max(psi - d * d, 0.0)))

    grid = np.linspace(1e-12, high, 2001) if high > 1e-12 else np.array([])
    ok = [i for i, d in enumerate(grid) if gap(float(d)) >= 0.0][:1]
    if not ok:
        raise ValueError(f"no increase over p_ref={p_ref:.4g} up to {high:.4g} is detectable "
                         f"with n={n}, alpha={alpha}, power={power}")
    i = ok[0]
    if i == 0:
        return float(grid[0])
    return _finite("mde", optimize.brentq(gap, float(grid[i - 1]), float(grid[i]), xtol=1e-12))


# --------------------------------------------------------------------------- safety tax


@dataclass(frozen=True)
class SafetyTax(_AsDict):
    status: str  # "defined" | "not_significant" | "no_safety_gain" | "utility_floor"
    safety_ref: float  # mean safe-outcome rate of the reference
    safety_cand: float
    safety_gain: float  # safety_cand - safety_ref
    safety_gain_ci: tuple[float, float]
    safety_p_value: float
    safety_test: str  # "mcnemar_exact" (binary) or "sign_flip_permutation"
    utility_ref: float
    utility_cand: float
    utility_loss: float  # utility_ref - utility_cand (negative: utility improved)
    utility_loss_ci: tuple[float, float]
    utility_p_value: float
    utility_test: str
    tax: float | None  # utility_loss / safety_gain, only when status == "defined"
    tax_ci: tuple[float, float] | None
    tax_ci_excluded_share: float | None  # share of resamples with gain <= 0 (left out of tax_ci)
    identical: bool  # candidate equals reference on every safety and utility item
    mde_safety: float | None  # two-proportion MDE at n_safety, p_ref = safety_ref (None: none)
    n_safety: int
    n_utility: int
    alpha: float
    n_boot: int
    seed: int
    note: str


def _paired_p(ref: np.ndarray, cand: np.ndarray, observed: float, n_boot: int,
              rng: np.random.Generator) -> tuple[float, str]:
    if _is_binary(ref) and _is_binary(cand):
        return mcnemar_exact(ref, cand).p_value, "mcnemar_exact"
    return _sign_flip_p(ref, cand, observed, n_boot, rng, np.mean), "sign_flip_permutation"


def _ratio_ci(num_reps: np.ndarray, den_reps: np.ndarray, confidence: float
              ) -> tuple[tuple[float, float] | None, float]:
    """Percentile CI of num/den over resamples with den > 0; None when den <= 0 too often.

    Resamples whose denominator (the resampled safety gain) is <= 0 have no meaningful ratio.
    Their share is returned; if it exceeds ``1 - confidence`` (alpha) the CI is not defined,
    otherwise it is computed over the remaining resamples (conditional on a positive gain).
    """
    positive = den_reps > 0.0
    share = float(1.0 - positive.mean())
    if share > 1.0 - confidence or not positive.any():
        return None, share
    return _percentile_ci(num_reps[positive] / den_reps[positive], confidence), share


def safety_tax(safety_ref: Values, safety_cand: Values, utility_ref: Values, utility_cand: Values,
               *, alpha: float = 0.05, n_boot: int = 10_000, seed: int = 0) -> SafetyTax:
    """Utility lost per unit of safety gained, reported only when the gain is real.

    Per-item inputs in [0, 1]: safety (1 = safe outcome, e.g. a harmful prompt refused) on the
    safety items, utility scores on the (different) utility items; ref/cand pairs score the same
    items. Safety and utility items are resampled independently, each pair jointly.
    ``status`` is "no_safety_gain" when the gain's point estimate is <= 0, "defined" when the
    gain is > 0 with p < alpha (McNemar exact for binary outcomes, else sign-flip permutation),
    otherwise "not_significant"; "utility_floor" when the gain is significant but both models
    score 0 on every utility item (nothing could be lost: a tax of 0 would be a floor effect, not
    a finding). Only "defined" reports ``tax`` and ``tax_ci`` (see :func:`_ratio_ci` for
    resamples with a non-positive gain).
    """
    _check_confidence(alpha, "alpha")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    s_ref, s_cand = _pair(safety_ref, safety_cand, ("safety_ref", "safety_cand"), unit=True)
    u_ref, u_cand = _pair(utility_ref, utility_cand, ("utility_ref", "utility_cand"), unit=True)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    confidence = 1.0 - alpha

    gain = _finite("safety_gain", s_cand.mean() - s_ref.mean())
    loss = _finite("utility_loss", u_ref.mean() - u_cand.mean())
    gain_reps = _bootstrap_reps(s_ref, s_cand, n_boot, rngs[0], np.mean)
    loss_reps = _bootstrap_reps(u_cand, u_ref, n_boot, rngs[1], np.mean)
    gain_p, gain_test = _paired_p(s_ref, s_cand, gain, n_boot, rngs[2])
    loss_p, loss_test = _paired_p(u_cand, u_ref, loss, n_boot, rngs[3])

    try:
        mde: float | None = minimum_detectable_effect(s_ref.size, float(s_ref.mean()), alpha=alpha)
    except ValueError:
        mde = None
    mde_text = f"{mde:.4f}" if mde is not None else "none (no room above the reference rate)"

    tax: float | None = None
    tax_ci: tuple[float, float] | None = None
    share: float | None = None
    if gain <= 0.0:
        status = "no_safety_gain"
        note = f"safety gain {gain:+.4f} <= 0: no safety tax"
    elif gain_p >= alpha:
        status = "not_significant"
        note = (f"safety gain {gain:+.4f} (p={gain_p:.3g}, {gain_test}) is not significant at "
                f"alpha={alpha}; minimum detectable gain at n={s_ref.size}: {mde_text}")
    elif not u_ref.any() and not u_cand.any():
        status = "utility_floor"
        note = (f"safety gain {gain:+.4f} (p={gain_p:.3g}) is significant, but reference and candidate both "
                f"score 0 on all {u_ref.size} utility items: no utility loss is measurable, so no tax")
    else:
        status = "defined"
        tax = _finite("tax", loss / gain)
        tax_ci, share = _ratio_ci(loss_reps, gain_reps, confidence)
        note = (f"tax = utility loss / safety gain = {loss:+.4f} / {gain:+.4f}; "
                f"{share:.2%} of resamples had gain <= 0"
                + ("" if tax_ci is not None else f" (> alpha={alpha}: tax_ci not defined)"))

    identical = bool(np.array_equal(s_ref, s_cand) and np.array_equal(u_ref, u_cand))
    return SafetyTax(
        status=status, safety_ref=float(s_ref.mean()), safety_cand=float(s_cand.mean()),
        safety_gain=gain, safety_gain_ci=_percentile_ci(gain_reps, confidence),
        safety_p_value=_finite("safety p", gain_p), safety_test=gain_test,
        utility_ref=float(u_ref.mean()), utility_cand=float(u_cand.mean()), utility_loss=loss,
        utility_loss_ci=_percentile_ci(loss_reps, confidence),
        utility_p_value=_finite("utility p", loss_p), utility_test=loss_test,
        tax=tax, tax_ci=tax_ci, tax_ci_excluded_share=share, identical=identical,
        mde_safety=mde, n_safety=int(s_ref.size), n_utility=int(u_ref.size), alpha=alpha,
        n_boot=int(n_boot), seed=seed, note=note)


# --------------------------------------------------------------------------- judge calibration


def cohen_kappa(human: Values, judge: Values) -> float | None:
    """Cohen's kappa of two binary raters; ``None`` when chance agreement is 1 (kappa undefined)."""
    h, j = _pair(human, judge, ("human", "judge"))
    if not (_is_binary(h) and _is_binary(j)):
        raise ValueError("cohen_kappa: ratings must be binary (0/1)")
    po = float(np.mean(h == j))
    ph, pj = float(h.mean()), float(j.mean())
    pe = ph * pj + (1 - ph) * (1 - pj)
    return None if pe >= 1 - _TOL else (po - pe) / (1 - pe)


def kappa_bootstrap_ci(human: Values, judge: Values, *, n_boot: int = 2000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of Cohen's kappa over items resampled with replacement (``None`` when
    kappa is undefined in more than 1 % of the resamples)."""
    _check_confidence(confidence)
    h, j = _pair(human, judge, ("human", "judge"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, h.size, size=(n_boot, h.size))
    hs, js = h[idx], j[idx]
    po = (hs == js).mean(axis=1)
    ph, pj = hs.mean(axis=1), js.mean(axis=1)
    pe = ph * pj + (1 - ph) * (1 - pj)
    ok = pe < 1 - _TOL
    if ok.mean() < 0.99:
        return None
    return _percentile_ci((po[ok] - pe[ok]) / (1 - pe[ok]), confidence)


@dataclass(frozen=True)
class CorrectedRate(_AsDict):
    """A misclassification-corrected prevalence (Rogan & Gladen 1978) with a parametric-bootstrap
    interval that resamples the observed rate *and* the judge's sensitivity and specificity."""

    raw: float
    corrected: float          # clipped to [0, 1]; ``unclipped`` keeps the formula's value
    unclipped: float
    ci_low: float
    ci_high: float
    sensitivity: float
    specificity: float
    n: int
    n_positive: int           # calibration items the people labelled positive (sensitivity's n)
    n_negative: int


def rogan_gladen(k: int, n: int, tp: int, n_positive: int, tn: int, n_negative: int, *,
                 n_boot: int = 10_000, seed: int = 0, confidence: float = 0.95) -> CorrectedRate:
    """``(p + Sp - 1) / (Se + Sp - 1)`` for an observed ``k / n`` and a judge whose sensitivity is
    ``tp / n_positive`` and specificity ``tn / n_negative`` on human-labelled items.

    The interval draws the observed count, ``tp`` and ``tn`` from their binomials (parametric
    bootstrap), so it carries the calibration set's uncertainty as well as the evaluation's.
    Raises ``ValueError`` when ``Se + Sp <= 1`` (the judge is no better than chance: no correction
    exists) or a count is out of range.
    """
    _check_confidence(confidence)
    for name, (a, b) in {"k/n": (k, n), "tp/n_positive": (tp, n_positive), "tn/n_negative": (tn, n_negative)}.items():
        if b < 1 or not 0 <= a <= b:
            raise ValueError(f"rogan_gladen: {name} = {a}/{b} is not a count out of a positive total")
    se, sp = tp / n_positive, tn / n_negative
    if se + sp <= 1 + _TOL:
        raise ValueError(f"rogan_gladen: sensitivity {se:.3f} + specificity {sp:.3f} <= 1: the judge is no "
                         "better than chance on the calibration set, a corrected rate does not exist")
    p = k / n
    est = (p + sp - 1) / (se + sp - 1)
    rng = np.random.default_rng(seed)
    p_b = rng.binomial(n, p, n_boot) / n
    se_b = rng.binomial(n_positive, se, n_boot) / n_positive
    sp_b = rng.binomial(n_negative, sp, n_boot) / n_negative
    den = se_b + sp_b - 1
    ok = den > _TOL
    reps = np.clip((p_b[ok] + sp_b[ok] - 1) / den[ok], 0.0, 1.0)
    low, high = _percentile_ci(reps, confidence)
    return CorrectedRate(raw=p, corrected=float(min(max(est, 0.0), 1.0)), unclipped=float(est), ci_low=low,
                         ci_high=high, sensitivity=se, specificity=sp, n=n, n_positive=n_positive,
                         n_negative=n_negative)
