"""mut44 (TH2, EB3): two parts of the Clopper-Pearson epsilon bound no test pinned.

TH2: Split must choose its threshold on the selection half alone. Choosing it on the evaluation half (data
snooping) passed every test: at significance 0.05 the Clopper-Pearson bounds are conservative enough that
the snooped bound stays under the true epsilon in test_cp_bound_never_exceeds_true_epsilon_gaussian_mechanism.
The guarantee itself, P(bound > 0) <= significance when in and out scores have one distribution, shows it
at a large significance: 0.23 of 400 null draws at 0.8 with the choice on the selection half, 0.88 (> 0.8)
with it on the evaluation half.

EB3: with two_sided, the bound is the larger of log((TPR_lo - delta) / FPR_hi) and the symmetric
log((1 - FPR_hi - delta) / (1 - TPR_lo)). A second rule with (1 - FPR_hi) in the denominator (never > 0)
passed every test, since test scores were symmetric Gaussians, where the first rule decides."""
import math

import numpy as np
import pytest
from scipy import stats

from audits.auditor import Explicit, Split, clopper_pearson_epsilon, epsilon_lower_bound


def test_split_bound_keeps_its_significance_under_the_null():
    rng = np.random.default_rng(0)
    trials, sig = 400, 0.8
    pos = 0
    for s in range(trials):
        ins, outs = rng.normal(size=100), rng.normal(size=100)
        pos += epsilon_lower_bound(ins, outs, significance=sig, two_sided=False, strategy=Split(seed=s)) > 0
    assert pos / trials <= sig, pos / trials


def test_two_sided_rule_uses_the_false_negative_rate():
    # Every member scores 1; half the non-members score 0, half 1. At threshold 1: TP = 200 of 200, FP = 100 of 200.
    ins, outs = np.ones(200), np.r_[np.zeros(100), np.ones(100)]
    sig, delta = 0.05, 1e-5
    a = sig / 2
    tpr_lo = stats.beta.ppf(a, 200, 1)            # k = n: a^(1/n)
    fpr_hi = stats.beta.ppf(1 - a, 101, 100)
    first = math.log(tpr_lo - delta) - math.log(fpr_hi)
    second = math.log(1 - fpr_hi - delta) - math.log(1 - tpr_lo)
    b = clopper_pearson_epsilon(ins, outs, significance=sig, delta=delta, strategy=Explicit(1.0))
    assert b.tpr_lower == pytest.approx(tpr_lo, rel=1e-9) and b.fpr_upper == pytest.approx(fpr_hi, rel=1e-9)
    assert second > first + 1
    assert b.epsilon == pytest.approx(max(first, second), rel=1e-9)
    one = clopper_pearson_epsilon(ins, outs, significance=sig, delta=delta, strategy=Explicit(1.0), two_sided=False)
    assert one.epsilon == pytest.approx(first, rel=1e-9)
