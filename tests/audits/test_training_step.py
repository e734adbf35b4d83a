"""`dpdm audit` checks the training loop's own step: `dpdm.train.plan_private_grad` (audit walk F3, stop 40).

The mechanism checks called `distributed_private_grad` with arguments of their own, so a training loop that
passed the engine half its plan's noise multiplier, or reused one noise seed at every step, passed them all.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dpdm.train as train_mod
from audits.mechanism import check_engine
from audits.suite import training_private_grad


def _failed(results):
    return sorted(r.name for r in results if not r.passed)


def test_the_audited_step_is_the_loops_step(monkeypatch):
    real = train_mod.plan_private_grad

    def half_noise(D, loss_fn, batch, plan, **kw):
        plan = type("Plan", (), {"clip_norm": plan.clip_norm, "noise_multiplier": plan.noise_multiplier / 2,
                                 "batch_size": plan.batch_size})()
        return real(D, loss_fn, batch, plan, **kw)

    monkeypatch.setattr(train_mod, "plan_private_grad", half_noise)
    assert {"noise_variance", "noise_once_per_step"} <= set(_failed(check_engine(training_private_grad(), pairs=20)))


def test_noise_reused_across_steps_fails(monkeypatch):
    real = train_mod.step_seed
    monkeypatch.setattr(train_mod, "step_seed", lambda seed, step, stream: real(seed, 0, stream))
    assert {"noise_variance", "noise_once_per_step"} <= set(_failed(check_engine(training_private_grad(), pairs=20)))


def test_noise_that_ignores_the_run_seed_fails(monkeypatch):
    """h123 F1 (stop 52): a step whose noise seed ignores the run's secret seed draws the same noise in every run,
    which anyone with the code can regenerate and subtract; every check of `dpdm audit` passed it (they compare steps
    of one run seed). noise_keyed_by_run_seed compares one step of two runs: it fails such a step and passes the
    real one."""
    from audits.mechanism import check_run_seed

    assert [(r.name, r.passed) for r in check_run_seed(training_private_grad(vary="run_seed"), pairs=10)] == [
        ("noise_keyed_by_run_seed", True)]
    real_step_seed, real_grad = train_mod.step_seed, train_mod.plan_private_grad
    mutants = {   # the noise stream keyed by the step alone; the run seed replaced by a constant (h123's mut_seed.py)
        "step_seed": lambda seed, step, stream: real_step_seed(0 if stream == train_mod._STREAM_DP_NOISE else seed,
                                                               step, stream),
        "plan_private_grad": lambda D, loss_fn, batch, plan, *, seed, step, **kw: real_grad(
            D, loss_fn, batch, plan, seed=12345, step=step, **kw),
    }
    for name, mutant in mutants.items():
        with monkeypatch.context() as m:
            m.setattr(train_mod, name, mutant)
            for rules in (True, False):
                r, = check_run_seed(training_private_grad(per_layer_rules=rules, vary="run_seed"), pairs=10)
                assert not r.passed and r.statistic == 0.0, (name, rules, r.detail)


def _seedless_after_an_lr_change(min_segments):
    """run_seed_at with the run seed left out of the hash once `min_segments` lr segments have begun: anyone with the
    code and the run's lr history (config.json, `dpdm train --json`) regenerates the DP noise of every later step."""
    import hashlib
    import json

    real = train_mod.run_seed_at

    def mutant(seed, lr_segments, step):
        segments = [seg for seg in (lr_segments or ()) if int(seg[0]) <= step]
        if len(segments) < min_segments:
            return real(seed, lr_segments, step)
        record = json.dumps([[int(a), float(b).hex(), str(c)] for a, b, c in segments])   # no seed
        return int.from_bytes(hashlib.sha256(record.encode()).digest()[:8], "big") & ((1 << 63) - 1)
    return mutant


_SUITE_CHECKS = ("check_engine", "check_run_seed", "check_fresh_noise", "check_noise_never_repeats", "check_network",
                 "check_sampler", "check_run")


def _mechanism_checks_only(monkeypatch, keep: str):
    """`audits.suite.mechanism_checks` with every check but `keep` (one of `_SUITE_CHECKS`) stubbed out; returns the
    stand-in plan document they take (noise multiplier 1)."""
    import types

    import audits.suite as suite

    assert keep in _SUITE_CHECKS
    for name in _SUITE_CHECKS:
        if name != keep:
            monkeypatch.setattr(suite, name, lambda *a, **k: [])
    monkeypatch.setattr(suite, "network_problem", lambda *a, **k: types.SimpleNamespace(description="none"))
    return types.SimpleNamespace(plan=types.SimpleNamespace(noise_multiplier=1.0))


def test_noise_that_ignores_the_run_seed_after_an_lr_change_fails(monkeypatch):
    """r2 F1 (stop 52): from an lr change on, `run_seed_at` derives a step's seed by another path (a hash of the
    run seed and the lr segments), which noise_keyed_by_run_seed never ran (one fixed step, no segments): a step
    whose noise ignored the seed after the change passed every mechanism check, also of a run resumed with --lr.
    `mechanism_checks` now tests a step after a change too, in the same check (one p-value, the Bonferroni count
    unchanged): a fixed pair where the run changed no lr, the run's own segments where it did."""
    import audits.suite as suite

    plan_doc = _mechanism_checks_only(monkeypatch, "check_run_seed")   # noise_keyed_by_run_seed alone
    own = [[0, 3e-4, "constant"], [4, 1e-3, "constant"], [9, 5e-4, "cosine"]]   # as the checkpoint records them

    def run_seed_checks(train_config):
        checks, _ = suite.mechanism_checks(None, plan_doc, {"train": train_config}, alpha=0.01 / 15, suite="quick")
        assert [c.name for c in checks] == ["noise_keyed_by_run_seed (rules)", "noise_keyed_by_run_seed (vmap)"]
        return checks

    for train_config in ({}, {"lr_segments": own}):
        assert all(c.passed for c in run_seed_checks(train_config)), train_config
    for min_segments, train_config, used in ((2, {}, "(3, 0.0005, constant)"),
                                             (3, {"lr_segments": own}, "(9, 0.0005, cosine) (the run's own)")):
        with monkeypatch.context() as m:   # seedless once a run's lr changed; once it changed twice (its own)
            m.setattr(train_mod, "run_seed_at", _seedless_after_an_lr_change(min_segments))
            checks = run_seed_checks(train_config)
        assert not any(c.passed for c in checks) and all(c.statistic == 0.0 for c in checks), checks
        assert all(used in c.detail for c in checks), checks[0].detail


@pytest.mark.slow   # about 20 s: trains a run and runs every mechanism check
def test_an_audit_of_a_run_resumed_with_another_lr_tests_its_own_lr_change(tmp_path, monkeypatch):
    """r2 F1 (stop 52), end to end: a run resumed at its checkpoint of step 4 with another lr records its lr
    segments in the checkpoint; its audit tests a step after that change, and fails noise that ignores the run's
    seed there."""
    from audits.suite import mechanism_checks
    from dpdm import checkpoint as ckpt
    from dpdm.train import TrainConfig, train
    from tests.dpdm.test_train import CFG, Stop, kill_as_step_begins, tiny_data, tiny_plan

    x, y, c = tiny_data()
    doc = tiny_plan(steps=12)
    run = tmp_path / "run"
    kill_as_step_begins(monkeypatch, 4)
    with pytest.raises(Stop):
        train(doc, x, y, c, run, TrainConfig(**{**CFG, "checkpoint_every": 4, "seed": None}), progress=False)
    monkeypatch.undo()
    train(doc, x, y, c, run, TrainConfig(**{**CFG, "checkpoint_every": 4, "seed": None, "lr": 1e-3}), resume=True,
          progress=False)
    config = ckpt.load_checkpoint(run / "checkpoint.pt")["config"]
    assert len(config["train"]["lr_segments"]) == 2
    monkeypatch.setattr(train_mod, "run_seed_at", _seedless_after_an_lr_change(2))
    checks, _ = mechanism_checks(run, doc, config, alpha=0.01 / 15, suite="quick")
    failed = {ch.name: ch for ch in checks if not ch.passed}
    assert set(failed) == {"noise_keyed_by_run_seed (rules)", "noise_keyed_by_run_seed (vmap)"}, failed
    assert "(4, 0.001, constant) (the run's own)" in failed["noise_keyed_by_run_seed (rules)"].detail


def test_every_run_has_both_engines_checked():
    """h123 F2 (stop 52): the audit checked the engine of the checkpoint's config, the last start's; a run started
    with the rules and resumed with --grad-engine vmap had its rules steps unchecked (and the reverse). The
    checkpoint records no earlier start's engine, so every run gets both, in the error budget too."""
    from audits.suite import run_grad_engines, statistical_check_count

    for rules in (True, False, None):
        assert run_grad_engines({"per_layer_rules": rules}) == ("rules", "vmap"), rules
        assert statistical_check_count({"per_layer_rules": rules}) == 15
        assert statistical_check_count({"per_layer_rules": rules, "subspace_dim": 3}) == 17


def test_train_loop_takes_each_steps_gradient_from_plan_private_grad(tmp_path, monkeypatch):
    import accounting
    from dpdm.train import TrainConfig, train

    n = 16
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32))
    y = torch.arange(n) % 2
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=4, steps=3, noise_multiplier=1.2, clip_norm=0.7,
                                  noise_multiplicity=2, delta=1e-5, dataset_name="tiny")
    calls = []
    real = train_mod.plan_private_grad
    monkeypatch.setattr(train_mod, "plan_private_grad",
                        lambda D, loss_fn, batch, p, **kw: calls.append((p, kw["seed"], kw["step"], batch[0]))
                        or real(D, loss_fn, batch, p, **kw))
    train(accounting.make_plan_document(plan), x, y, 2, tmp_path / "run",
          TrainConfig(model="small", checkpoint_every=3, log_every=1, seed=3), progress=False)
    assert [c[2] for c in calls] == [0, 1, 2] and all(c[1] == calls[0][1] for c in calls)
    assert all((c[0].noise_multiplier, c[0].clip_norm, c[0].batch_size) == (1.2, 0.7, 4) for c in calls)
    # Each step's images are the Poisson batch the accountant assumes: the plan's rate, the run's seed (a loop
    # sampling at twice the rate passed every test and the audit's checks of short runs; stop 46, h85).
    from dpdm.data import PoissonSampler

    sampler = PoissonSampler(n, plan.sample_rate, seed=3)
    for _, _, step, images in calls:
        assert torch.equal(images, x[sampler.batch(step)]), step


def test_noise_that_is_no_function_of_the_run_seed_after_an_lr_change_fails(monkeypatch):
    """mut55 (stop 53), a03 a04: noise_keyed_by_run_seed also asks that one run seed twice give the same noise (a
    resume replays its steps; `dpdm train` draws nothing but from its seeds), of each step it tests. A step after an
    lr change whose seed was fresh entropy, not `run_seed_at`'s hash, passed where the replay ran for the first step
    alone, or not at all: its variance is right, only its replay differs."""
    import secrets

    from audits.mechanism import check_run_seed
    from audits.suite import LR_CHANGE

    real = train_mod.run_seed_at

    def fresh_after_a_change(seed, lr_segments, step):
        if len([seg for seg in (lr_segments or ()) if int(seg[0]) <= step]) > 1:
            return secrets.randbits(62)
        return real(seed, lr_segments, step)

    monkeypatch.setattr(train_mod, "run_seed_at", fresh_after_a_change)
    r, = check_run_seed(training_private_grad(vary="run_seed"), pairs=5,
                        after_lr_change=training_private_grad(vary="run_seed", lr_segments=LR_CHANGE))
    assert not r.passed and "the same generator seed twice: largest difference" in r.detail, r.detail
    monkeypatch.undo()
    r, = check_run_seed(training_private_grad(vary="run_seed"), pairs=5,
                        after_lr_change=training_private_grad(vary="run_seed", lr_segments=LR_CHANGE))
    assert r.passed, r.detail


def test_a_run_that_records_one_lr_segment_is_tested_after_the_fixed_lr_change_and_a_zero_sigma_refused():
    """mut55 (stop 53), a05 a07: a run whose config records a single lr segment (a library config's) changed no lr:
    noise_keyed_by_run_seed tests a step after ``LR_CHANGE`` for it, not its own segment (which is the run seed's
    path again, leaving `run_seed_at`'s hash path untested). And a noise multiplier of 0 is refused as any bad one,
    not run into a division by zero."""
    from audits.mechanism import check_run_seed
    from audits.suite import LR_CHANGE, lr_change_segments

    assert lr_change_segments({"lr_segments": [[0, 1e-3, "constant"]]}) is LR_CHANGE
    assert lr_change_segments({}) is LR_CHANGE
    own = [[0, 3e-4, "constant"], [4, 1e-3, "cosine"]]
    assert lr_change_segments({"lr_segments": own}) == ((0, 3e-4, "constant"), (4, 1e-3, "cosine"))
    for bad in (0, 0.0, -1.0, "1"):
        with pytest.raises(ValueError, match=r"noise_multiplier=.* must be a number > 0"):
            check_run_seed(training_private_grad(vary="run_seed"), noise_multiplier=bad)


def test_noise_shared_by_neighbouring_steps_fails_noise_fresh_each_step(monkeypatch):
    """h143 F1 (stop 54): every noise check compared two random steps of 2**62, never neighbours, so a step that
    drew the noise of the step before it (a seed from ``step // 2``, an off-by-one) passed every mechanism check
    and `dpdm audit` said INCONCLUSIVE. noise_fresh_each_step compares consecutive steps of one run, of both
    parities and across an lr change, in `mechanism_checks` for both engines: it fails each such step and passes
    the real one. (In plan_private_grad the step feeds the noise seed alone: the batch comes in.)"""
    import audits.suite as suite
    from audits.mechanism import check_fresh_noise

    plan_doc = _mechanism_checks_only(monkeypatch, "check_fresh_noise")   # noise_fresh_each_step alone
    real = train_mod.plan_private_grad
    change = suite.LR_CHANGE[-1][0]

    def fresh_checks(mutate=None):
        with monkeypatch.context() as m:
            if mutate is not None:
                m.setattr(train_mod, "plan_private_grad", lambda D, f, b, plan, *, step, lr_segments=None, **kw: real(
                    D, f, b, plan, step=mutate(step, lr_segments), lr_segments=lr_segments, **kw))
            checks, _ = suite.mechanism_checks(None, plan_doc, {"train": {}}, alpha=0.01 / 15, suite="quick")
        assert [c.name for c in checks] == ["noise_fresh_each_step (rules)", "noise_fresh_each_step (vmap)"]
        return checks

    assert all(c.passed for c in fresh_checks()), fresh_checks()[0].detail
    mutants = {"steps 2j, 2j + 1 share": lambda step, segs: step // 2 * 2,
               "steps 2j + 1, 2j + 2 share": lambda step, segs: (step + 1) // 2 * 2,
               "the lr change's step reuses the step before it":
                   lambda step, segs: step - 1 if segs and step == change else step}
    for name, mutate in mutants.items():   # both engines for the first, the rules engine alone for the others
        if name == "steps 2j, 2j + 1 share":
            checks = fresh_checks(mutate)
        else:
            with monkeypatch.context() as m:
                m.setattr(train_mod, "plan_private_grad", lambda D, f, b, plan, *, step, lr_segments=None, **kw: real(
                    D, f, b, plan, step=mutate(step, lr_segments), lr_segments=lr_segments, **kw))
                checks = check_fresh_noise(training_private_grad(vary="consecutive"), alpha=0.01 / 15, pairs=5,
                                           after_lr_change=training_private_grad(vary="consecutive",
                                                                                 lr_segments=suite.LR_CHANGE),
                                           lr_change_step=change)
        assert not any(c.passed for c in checks) and all(c.statistic == 0.0 for c in checks), (name, checks[0].detail)


def test_mechanism_checks_test_the_steps_on_either_side_of_the_runs_own_lr_change(monkeypatch):
    """mut57 (stop 54): `dpdm audit`'s noise_fresh_each_step takes the pair of steps across the lr change, the run's
    own where its checkpoint records one (else `LR_CHANGE`'s): a step right after the change that reuses the noise
    of the step before it fails in `mechanism_checks`, for both engines, not only when the check is called alone."""
    import audits.suite as suite

    plan_doc = _mechanism_checks_only(monkeypatch, "check_fresh_noise")   # noise_fresh_each_step alone
    real = train_mod.plan_private_grad
    monkeypatch.setattr(train_mod, "plan_private_grad", lambda D, f, b, plan, *, step, lr_segments=None, **kw: real(
        D, f, b, plan, step=step - 1 if lr_segments and step == int(lr_segments[-1][0]) else step,
        lr_segments=lr_segments, **kw))
    for train_config in ({}, {"lr_segments": [[0, 1e-3, "constant"], [8, 5e-4, "constant"]]}):
        checks, _ = suite.mechanism_checks(None, plan_doc, {"train": train_config}, alpha=0.01 / 15, suite="quick")
        assert [c.name for c in checks] == ["noise_fresh_each_step (rules)", "noise_fresh_each_step (vmap)"]
        assert not any(c.passed for c in checks) and all(c.statistic == 0.0 for c in checks), \
            (train_config, checks[0].detail)


def test_noise_fresh_each_step_without_an_lr_change_tests_both_parities(monkeypatch):
    """mut57 (stop 54): called alone (no run whose lr changed), noise_fresh_each_step still takes pairs of steps of
    both parities, (0, 1), (2, 3), ... and (1, 2), (3, 4), ...: noise shared by steps 2j + 1 and 2j + 2 fails it, as
    noise shared by steps 2j and 2j + 1 does."""
    from audits.mechanism import check_fresh_noise

    real = train_mod.plan_private_grad
    for mutate in (lambda step: step // 2 * 2, lambda step: (step + 1) // 2 * 2):
        with monkeypatch.context() as m:
            m.setattr(train_mod, "plan_private_grad", lambda D, f, b, plan, *, step, **kw: real(
                D, f, b, plan, step=mutate(step), **kw))
            checks = check_fresh_noise(training_private_grad(vary="consecutive"), alpha=0.01 / 15, pairs=5)
        assert [c.name for c in checks] == ["noise_fresh_each_step"]
        assert not checks[0].passed and checks[0].statistic == 0.0, checks[0].detail
    assert check_fresh_noise(training_private_grad(vary="consecutive"), alpha=0.01 / 15, pairs=5)[0].passed


def test_noise_repeated_every_n_steps_fails_noise_never_repeats(monkeypatch):
    """r2 F2 (stop 54): a step whose noise seed was keyed by ``step % N`` (the step within an epoch) drew the noise of
    step s + N at step s, and passed every mechanism check from N of about 64 (neighbours and two random steps of
    2**62 never are N apart). noise_never_repeats, in `mechanism_checks` for both engines, compares the noise alone
    of steps 0 to 2047 and 2**k exactly: ``step % 1000`` fails it (both engines), and the real step passes."""
    import audits.suite as suite
    from audits.mechanism import REPEAT_NOISE_CHECKS, check_noise_never_repeats

    assert REPEAT_NOISE_CHECKS == ("noise_never_repeats",)
    plan_doc = _mechanism_checks_only(monkeypatch, "check_noise_never_repeats")   # noise_never_repeats alone
    checks, _ = suite.mechanism_checks(None, plan_doc, {"train": {}}, alpha=0.01 / 15, suite="quick")
    assert [c.name for c in checks] == ["noise_never_repeats (rules)", "noise_never_repeats (vmap)"]
    assert all(c.passed and c.statistic == 0 and c.p_value is None for c in checks), checks[0].detail
    assert "0 to 2047 and 2**k for k = 11 to 62: no two equal or opposite" in checks[0].detail, checks[0].detail
    seed_of = train_mod.step_seed
    monkeypatch.setattr(train_mod, "step_seed", lambda seed, step, stream: seed_of(seed, step % 1000, stream))
    checks, _ = suite.mechanism_checks(None, plan_doc, {"train": {}}, alpha=0.01 / 15, suite="quick")
    assert not any(c.passed for c in checks), checks[0].detail
    assert all("(the first: step 1000 drew the noise of step 0)" in c.detail for c in checks), checks[0].detail
    # A step whose noise is minus another's (antithetic pairs) fails it; a period of 2**40 shows at the powers of two
    base = training_private_grad(vary="consecutive")

    def antithetic(model, loss_fn, *batch, generator, **kw):
        s = generator.initial_seed()
        out = base(model, loss_fn, *batch, generator=torch.Generator().manual_seed(s // 2 * 2), **kw)
        return {k: -v for k, v in out.items()} if s % 2 else out

    found = check_noise_never_repeats(antithetic, steps=8, powers=3)[0]
    assert not found.passed and found.statistic == 4 and "step 1 drew minus the noise of step 0" in found.detail, found
    monkeypatch.setattr(train_mod, "step_seed", lambda seed, step, stream: seed_of(seed, step % 2**40, stream))
    found = check_noise_never_repeats(base, steps=8)[0]
    assert not found.passed and "step 1099511627776 drew the noise of step 0" in found.detail, found
