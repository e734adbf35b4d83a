"""The README's privacy figures are the ones dpdm computes.

F1: the demo section read "what eps 10 means for one image: ... at most 24.6%", but 24.6% is the demo's plan's bound
(30 steps at sample rate 0.256); the Quick start's eps-10 plan allows 29.6%, and (10, 1e-5) alone caps nothing.
F2: the README quoted "the quick suite's 200 [canaries] certify at most about epsilon 3.3"; `dpdm audit` with its
default --seed draws 101 of 200 in and says (and can certify at most) 3.124, as the demo's report shows."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _demo_section() -> str:
    text = README.read_text()
    return text.split("## What `make demo` does", 1)[1].split("\n## ", 1)[0]


def test_the_demo_membership_figure_is_tied_to_the_demos_plan_not_to_eps_10():
    import accounting

    demo = _demo_section()
    bullet = next(b for b in demo.split("\n- ") if "24.6%" in b)
    assert "what eps 10 means" not in bullet, bullet
    assert "demo's plan" in bullet, bullet
    # The claim it must not make: another eps-10 plan (the Quick start's) allows clearly more than 24.6%.
    quick = accounting.PrivacyPlan(dataset_size=4000, batch_size=256, steps=469, noise_multiplier=0.978248,
                                   noise_multiplicity=2, delta=1e-5)
    assert accounting.membership_bound(quick.to_event(), (0.01,)).tpr[0.01] > 0.29


def test_readme_quotes_the_quick_suites_ceiling_that_dpdm_audit_reports():
    from audits.canary import certifiable_epsilon, draw_inclusion
    from audits.suite import SUITES

    m = SUITES["quick"]["num_canaries"]
    level = 0.05 * 0.8 / 2                               # the canary share, over the loss and PIA attacks
    n_in = int(draw_inclusion(m, 0).sum())               # `dpdm audit`'s default --seed 0
    shown = certifiable_epsilon(m, 1e-5, level, n_in)    # 3.125: the warning and verdict say 3.124
    quoted = [float(x) for x in re.findall(r"200 certify at most about\s+epsilon ([\d.]+)|200\s+canaries, at most "
                                           r"about ([\d.]+)", README.read_text()) for x in x if x]
    assert len(quoted) == 2, quoted
    for q in quoted:
        assert q == pytest.approx(shown, abs=0.05), (q, shown)
