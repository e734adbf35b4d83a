"""Empirical privacy audits (DESIGN.md section 5). Higher score means member.

Modules (import them by name; this package imports nothing, so ``import audits`` stays light):

* ``audits.auditor``: statistics from scores (Clopper-Pearson, one-run bound, ROC, DP ceilings);
  numpy and scipy only.
* ``audits.plots``: ROC (linear and log-log, DP ceiling), score histograms, bound vs guesses.
* ``audits.mechanism``: engine, sampler and run-vs-plan checks (``check_engine(private_grad_fn)`` on a tiny
  float64 model, ``check_network`` on the run's own network in float32).
* ``audits.scores``: calibrated loss attack, PIA, nearest-synthetic-neighbour distance.
* ``audits.canary``: the one-run canary audit with a positive control.
* ``audits.suite``: what ``dpdm audit`` runs: verdict, error budget, report folder.
"""
