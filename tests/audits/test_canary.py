"""Canary audit: canaries, coins, reproducible training, and audit power.

Audit power (Must show): trained with the noise off and audited against a plan claiming epsilon 1,
the canary audit says FAIL; trained correctly under that plan it never says FAIL (several seeds in
the slow variant). Tiny setting: 8x8 `digits`, 128 canaries, a small MLP denoiser, 150 steps.
"""

import numpy as np
import pytest
import torch

import accounting
from accounting import PrivacyPlan
from audits.canary import CanaryConfig, MLPNet, canary_audit, draw_inclusion, make_canaries, train_with_canaries
from dpdm.datasets import load_dataset
from dpdm.precond import EDMPrecond


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def plan_eps1():
    # q = 0.25, 150 steps, noise calibrated to epsilon = 1 at delta = 1e-5
    return PrivacyPlan(dataset_size=256, batch_size=64, steps=150, noise_multiplier=1.0, delta=1e-5).calibrate(epsilon=1.0)


def tiny_mlp():
    return EDMPrecond(MLPNet(img_resolution=8, img_channels=1, num_classes=10, hidden=128))


POWER = CanaryConfig(num_canaries=128, background_size=128, noise_multiplicity=1, lr=5e-3, attacks=("loss", "pia"))


def test_make_canaries_ood_and_mislabelled(digits):
    x, y = make_canaries(50, (1, 8, 8), 10, kind="ood", seed=3)
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,)
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    flat = x.reshape(50, -1)
    assert torch.cdist(flat, flat).fill_diagonal_(99).min() > 0  # mutually distinct
    x2, _ = make_canaries(50, (1, 8, 8), 10, kind="ood", seed=3)
    assert torch.equal(x, x2)
    xm, ym = make_canaries(20, (1, 8, 8), 10, kind="mislabelled", seed=0, pool_x=digits.x[:100], pool_y=digits.y[:100])
    # every canary is a pool image with a wrong label
    for img, lab in zip(xm, ym):
        j = int(torch.nonzero((digits.x[:100] == img).all(dim=(1, 2, 3)))[0])
        assert lab != digits.y[j]
    with pytest.raises(ValueError, match="pool"):
        make_canaries(20, (1, 8, 8), 10, kind="mislabelled", pool_x=digits.x[:5], pool_y=digits.y[:5])
    _, none = make_canaries(4, (3, 4, 4), 0)
    assert none is None


def test_draw_inclusion_is_seeded_and_fair():
    a, b, c = draw_inclusion(2000, 0), draw_inclusion(2000, 0), draw_inclusion(2000, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 900 < a.sum() < 1100


def test_training_is_reproducible_and_noise_matters(digits, plan_eps1):
    cfg = CanaryConfig(num_canaries=8, steps=3, noise_multiplicity=1, seed=4)
    x, y = digits.x[:64], digits.y[:64]
    a = train_with_canaries(plan_eps1, x, y, 10, cfg, denoiser_factory=tiny_mlp)
    b = train_with_canaries(plan_eps1, x, y, 10, cfg, denoiser_factory=tiny_mlp)
    c = train_with_canaries(plan_eps1, x, y, 10, cfg, noise=False, denoiser_factory=tiny_mlp)
    for (n, p), q, r in zip(a.model.named_parameters(), b.model.parameters(), c.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert any(not torch.equal(p, r) for p, r in zip(a.model.parameters(), c.model.parameters()))
    # the reference is the untouched initialization
    assert any(not torch.equal(p, r) for p, r in zip(a.model.parameters(), a.reference.parameters()))
    assert a.info["steps"] == 3 and a.info["noise_multiplier"] == plan_eps1.noise_multiplier
    assert c.info["noise_multiplier"] == 0.0 and a.info["sample_rate"] == plan_eps1.sample_rate


class _Constant(torch.nn.Module):
    """A denoiser that outputs theta everywhere: with theta far above the images, every example's gradient points
    along theta's (nearly the same for all), so each clipped one has norm C and a batch's clipped sum |B| * C."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.full((1, 8, 8), 1e4))

    def forward(self, x, sigma, class_labels=None):
        return self.theta.expand(x.shape[0], -1, -1, -1)


def test_canary_run_uses_the_plans_sample_rate_clip_norm_noise_and_divisor(digits, plan_eps1, monkeypatch):
    """What the canary run trains with, measured, not read back from its report (h74 F1: a copy of the DP step
    with 10x the noise, or C / 10, passed every test): the sampler it draws batches from (n, q), and the gradient
    it hands the optimizer each step (an optimizer that records and never moves the weights, so the noisy and
    the control run see the same clipped sums): noise-free it is |B| * C / the given divisor; the noise between the
    two runs has std noise_multiplier * C / divisor. Both runs go through `dpdm train`'s `plan_private_grad`."""
    import dpdm.data
    import dpdm.train

    samplers, grads, calls = [], [], []

    class Sampler(dpdm.data.PoissonSampler):
        def __init__(self, n, q, **kw):
            super().__init__(n, q, **kw)
            samplers.append(self)
            self.sizes = []

        def batch(self, step):
            idx = super().batch(step)
            self.sizes.append(len(idx))
            return idx

    class Recorder:
        def __init__(self, params, lr):
            self.params = list(params)
            grads.append([])

        def step(self):
            grads[-1].append(torch.cat([p.grad.reshape(-1) for p in self.params]).double())

        def zero_grad(self, set_to_none=True):
            for p in self.params:
                p.grad = None

    real_step = dpdm.train.plan_private_grad

    def spy(D, loss_fn, batch, plan, **kw):
        calls.append(plan.noise_multiplier)
        return real_step(D, loss_fn, batch, plan, **kw)

    monkeypatch.setattr(dpdm.data, "PoissonSampler", Sampler)
    monkeypatch.setattr(torch.optim, "Adam", Recorder)
    monkeypatch.setattr(dpdm.train, "plan_private_grad", spy)
    x, steps, divisor = digits.x[:40], 30, 7.5   # the divisor given, not q * 40 = 10
    cfg = CanaryConfig(num_canaries=8, steps=steps, noise_multiplicity=1, seed=3)
    noisy = train_with_canaries(plan_eps1, x, None, 0, cfg, denoiser_factory=_Constant, expected_batch_size=divisor)
    clean = train_with_canaries(plan_eps1, x, None, 0, cfg, noise=False, denoiser_factory=_Constant,
                                expected_batch_size=divisor)
    q, C, sigma = plan_eps1.sample_rate, plan_eps1.clip_norm, plan_eps1.noise_multiplier
    assert [(s.dataset_size, s.sample_rate) for s in samplers] == [(40, q), (40, q)]
    assert samplers[0].sizes == samplers[1].sizes and sum(samplers[1].sizes) > 0
    assert calls == [sigma] * steps + [0.0] * steps   # the training loop's own step, the plan's sigma, 0 in control
    for size, g in zip(samplers[1].sizes, grads[1]):
        assert float(g.norm()) * divisor == pytest.approx(size * C, rel=1e-4)
    noise = torch.stack([a - b for a, b in zip(grads[0], grads[1])]) * divisor
    assert float(noise.std()) == pytest.approx(sigma * C, rel=0.1) and abs(float(noise.mean())) < 0.2 * sigma * C
    assert noisy.info["noise_multiplier"] == sigma and clean.info["noise_multiplier"] == 0.0
    assert noisy.info["clip_norm"] == C and noisy.info["expected_batch_size"] == divisor


def _audit(digits, plan, *, private, seed, control=False, config=POWER):
    from dataclasses import replace

    return canary_audit(plan, digits.x, digits.y, 10, replace(config, seed=seed), claimed_epsilon=1.0,
                        private=private, control=control, denoiser_factory=tiny_mlp)


def test_audit_power_noise_off_fails_and_private_does_not(digits, plan_eps1):
    broken = _audit(digits, plan_eps1, private=False, seed=0, control=True)
    assert broken["verdict"] == "FAIL", broken["reasons"]
    assert broken["max_epsilon_lower_bound"] > 1.0
    # with private=False the target is itself the control
    assert broken["control_max_epsilon"] == broken["max_epsilon_lower_bound"]
    good = _audit(digits, plan_eps1, private=True, seed=0)
    assert good["verdict"] != "FAIL", good["reasons"]
    assert good["max_epsilon_lower_bound"] <= 1.0
    assert good["training"]["target"]["noise_multiplier"] == plan_eps1.noise_multiplier
    # bookkeeping of the report
    assert good["canaries"]["count"] == 128 and len(good["included"]) == 128
    assert good["significance_per_attack"] == pytest.approx(0.02)
    for attack in ("loss", "pia"):
        rep = good["attacks"][attack]["target"]
        assert rep["one_run"]["significance"] == pytest.approx(0.02)
        assert rep["clopper_pearson"]["valid_here"] is False


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_audit_power_over_seeds(digits, plan_eps1, seed):
    full = _audit(digits, plan_eps1, private=True, seed=seed, control=True)
    assert full["verdict"] == "PASS", full["reasons"]  # never FAIL, and the control has power
    assert full["control_max_epsilon"] > 1.0
    broken = _audit(digits, plan_eps1, private=False, seed=seed)
    assert broken["verdict"] == "FAIL", broken["reasons"]


def test_control_without_power_is_inconclusive(digits, plan_eps1):
    weak = CanaryConfig(num_canaries=32, background_size=32, noise_multiplicity=1, steps=2, lr=1e-9)
    r = _audit(digits, plan_eps1, private=True, seed=0, control=True, config=weak)
    assert r["verdict"] == "INCONCLUSIVE", r["reasons"]
    assert r["control_max_epsilon"] == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_canaries": 1}, "num_canaries"),
        ({"canary_kind": "weird"}, "canary_kind"),
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"attacks": ("lira",)}, "attacks"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CanaryConfig(**kwargs)


def test_audit_argument_validation(digits, plan_eps1):
    with pytest.raises(ValueError, match="claimed_epsilon"):
        canary_audit(plan_eps1, digits.x, digits.y, 10, POWER, claimed_epsilon=-1)
    with pytest.raises(ValueError, match="x="):
        canary_audit(plan_eps1, digits.x[0], digits.y, 10, POWER, claimed_epsilon=1)
    # A plan document: AttributeError 'PlanDocument' object has no attribute 'delta' (h134 F4, stop 53)
    with pytest.raises(ValueError, match=r"^plan is a PlanDocument; canary_audit takes an accounting.PrivacyPlan"):
        canary_audit(accounting.make_plan_document(plan_eps1), digits.x, digits.y, 10, POWER, claimed_epsilon=1)


def test_verdict_rule():
    """FAIL above the claim; INCONCLUSIVE when the attacks had too little power to test the claim: no bound could
    have exceeded it (ceiling at or below the claim), or the positive control does not reach the claim (not merely
    > 0); PASS otherwise, never "privacy verified"."""
    from audits.canary import canary_verdict

    assert canary_verdict(3.1, 5.0, 4.0, 3.0, num_canaries=200, worst_attack="pia")[0] == "FAIL"
    # A control below the claim makes no INCONCLUSIVE of a bound above it: that audit could fail, and did.
    assert canary_verdict(3.1, 1.0, 4.0, 3.0, num_canaries=200, worst_attack="pia")[0] == "FAIL"
    verdict, reasons = canary_verdict(1.0, 3.0, 3.28, 9.997, num_canaries=200)  # the demo: eps 10, 200 canaries
    assert verdict == "INCONCLUSIVE"
    assert "with 200 canaries this audit cannot certify more than epsilon 3.28," in reasons[0]
    assert "claim 9.997" in reasons[0] and "--canaries" in reasons[0]
    assert canary_verdict(0.5, 2.0, 2.0, 2.0, num_canaries=200)[0] == "INCONCLUSIVE"  # ceiling == claim
    verdict, reasons = canary_verdict(0.2, 0.8, 2.7, 1.0, num_canaries=128)  # control > 0 but below the claim
    assert verdict == "INCONCLUSIVE" and "positive control" in reasons[0] and "only 0.8 <=" in reasons[0]
    assert canary_verdict(0.2, 1.0, 2.7, 1.0, num_canaries=128)[0] == "INCONCLUSIVE"  # control == claim
    verdict, reasons = canary_verdict(0.2, 1.5, 2.7, 1.0, num_canaries=128)
    assert verdict == "PASS" and reasons[0].startswith("no violation detected at the stated power")
    assert "verified" not in " ".join(reasons)
    # The claim rounded up, as the verdict line shows it (1.049, where ".3f" wrote 1.048), lower bounds down.
    verdict, reasons = canary_verdict(0.2, 1.0, 0.72149, 1.04851, num_canaries=20)
    assert "cannot certify more than epsilon 0.7214, so it cannot detect a violation of the claim 1.049" in reasons[0]
    verdict, reasons = canary_verdict(1.04869, 1.0, 2.7, 1.04851, num_canaries=20, worst_attack="pia")
    assert verdict == "FAIL"
    assert reasons == ["pia attack: one-run epsilon lower bound 1.04869 > claimed epsilon 1.04851"]


def test_audit_that_cannot_fail_is_inconclusive_even_with_a_leaking_control(digits, plan_eps1):
    """32 canaries certify at most about 1.15: a claim of 2 cannot be refuted, whatever the attack finds."""
    from dataclasses import replace

    cfg = replace(POWER, num_canaries=32, background_size=64, steps=60, seed=0)
    r = canary_audit(plan_eps1, digits.x, digits.y, 10, cfg, claimed_epsilon=2.0, private=False, control=True,
                     denoiser_factory=tiny_mlp)
    assert r["control_max_epsilon"] > 0.0  # the control leaks, yet (below the claim) that shows no power
    assert r["max_certifiable_epsilon"] <= 2.0
    assert r["verdict"] == "INCONCLUSIVE", r["reasons"]
    assert "cannot certify more than" in r["reasons"][0] and r["can_detect_violation"] is False


CHEAP = CanaryConfig(num_canaries=8, background_size=16, noise_multiplicity=1, steps=1, attacks=("loss", "pia"))


@pytest.mark.parametrize("m, seed, n_in", [(2, 0, 0), (3, 8, 3)])
def test_audit_with_one_class_of_canaries_skips_two_class_statistics(digits, plan_eps1, m, seed, n_in):
    """Coins that include no canary or all of them: the one-run bound stands, AUC/ROC/CP are skipped, the coins
    are not redrawn."""
    from dataclasses import replace

    assert int(draw_inclusion(m, seed).sum()) == n_in
    r = canary_audit(plan_eps1, digits.x, digits.y, 10, replace(CHEAP, num_canaries=m, seed=seed),
                     claimed_epsilon=1.0, denoiser_factory=tiny_mlp)
    assert r["included"] == draw_inclusion(m, seed).tolist() and r["canaries"]["included"] == n_in
    assert r["verdict"] == "INCONCLUSIVE"  # so few canaries certify nothing
    assert any(f"included {n_in} of {m} canaries" in reason for reason in r["reasons"])
    for attack in ("loss", "pia"):
        for run in ("target", "control"):
            rep = r["attacks"][attack][run]
            assert rep["two_class_statistics"] is False and rep["auc"] is None and rep["clopper_pearson"] is None
            assert rep["one_run"]["num_canaries"] == m and rep["epsilon_lower_bound"] == 0.0


def test_canary_run_divides_by_a_constant_independent_of_the_coins(digits, plan_eps1):
    """As `dpdm train` divides by the public batch size: q * (background + all canaries), not the included ones."""
    from dataclasses import replace

    for seed in (0, 1):
        cfg = replace(CHEAP, seed=seed)
        r = canary_audit(plan_eps1, digits.x, digits.y, 10, cfg, claimed_epsilon=1.0, denoiser_factory=tiny_mlp)
        assert r["canaries"]["included"] < 8  # so the coin-dependent q * (16 + included) would differ
        for run in ("target", "control"):
            info = r["training"][run]
            assert info["expected_batch_size"] == pytest.approx(plan_eps1.sample_rate * (16 + 8))
            assert "16 + 8" in info["normalizer"]


def test_can_detect_violation_uses_only_the_one_run_ceiling(digits, plan_eps1):
    """The Clopper-Pearson ceiling is not valid for one training run: it must not say a violation is detectable."""
    from dataclasses import replace

    plan = replace(plan_eps1, delta=1e-3)  # 2 m delta kills the one-run ceiling, not the Clopper-Pearson one
    r = canary_audit(plan, digits.x, digits.y, 10, replace(CHEAP, num_canaries=32), claimed_epsilon=0.3,
                     denoiser_factory=tiny_mlp)
    for attack in ("loss", "pia"):
        rep = r["attacks"][attack]["target"]
        assert rep["max_certifiable_epsilon"]["clopper_pearson"] > 0.3 >= rep["max_certifiable_epsilon"]["one_run"]
        assert rep["can_detect_violation"] is False
    assert r["can_detect_violation"] is False and r["verdict"] == "INCONCLUSIVE"


def _old_ood(m, shape, num_classes, seed):
    """The ood canaries as they were drawn before stop 42: a 4x4 grid of +-1 blocks, nothing else."""
    C, H, W = shape
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), 0xCA7]).generate_state(1)[0]))
    bh, bw = max(1, H // 4), max(1, W // 4)
    coarse = torch.randint(0, 2, (m, C, -(-H // bh), -(-W // bw)), generator=g).float() * 2 - 1
    x = coarse.repeat_interleave(bh, 2).repeat_interleave(bw, 3)[:, :, :H, :W].contiguous()
    return x, (torch.randint(0, num_classes, (m,), generator=g) if num_classes > 0 else None)


def _differences(x):
    """[m, m] number of pixel values in which two +-1 canaries differ (the diagonal set to all of them)."""
    flat = x.reshape(len(x), -1)
    d = (flat.shape[1] - flat @ flat.T) / 2
    return d.fill_diagonal_(flat.shape[1])


def test_5000_ood_canaries_of_28x28_differ_pairwise_in_an_eighth_of_their_pixels():
    """Audit walk F3 (stop 42): grayscale canaries came from 2^16 patterns (a 4x4 grid of blocks), so 5,000 of
    them at 28x28 held 190 exact copies, and 200 already held pairs one block (1/16 of the image) apart. Now any
    two differ in at least 1/8 of their pixels (98 of 784): a finer grid where m needs it, and a canary too close
    to an earlier one redrawn."""
    x, y = make_canaries(5000, (1, 28, 28), 10, seed=0)
    assert x.shape == (5000, 1, 28, 28) and set(x.unique().tolist()) == {-1.0, 1.0} and y.shape == (5000,)
    assert int(_differences(x).min()) >= 98
    from audits.canary import CANARY_MIN_DIFFERENCE

    assert CANARY_MIN_DIFFERENCE == 1 / 8
    again, _ = make_canaries(5000, (1, 28, 28), 10, seed=0)
    assert torch.equal(x, again)   # deterministic in the seed
    other, _ = make_canaries(5000, (1, 28, 28), 10, seed=1)
    assert not torch.equal(x, other)


def test_canaries_that_were_far_apart_keep_their_old_patterns():
    """The quick suite's 200 canaries keep the 4x4 grid: only those within one block of an earlier one are
    redrawn (3 of 200 at seed 0, on 8x8 digits), the labels are unchanged; colour images, whose 4x4 grid has 2^48
    patterns, keep every canary."""
    x, y = make_canaries(200, (1, 8, 8), 10, seed=0)
    old_x, old_y = _old_ood(200, (1, 8, 8), 10, 0)
    assert torch.equal(y, old_y)
    d_old = _differences(old_x)
    too_close = {j for j in range(200) if any(d_old[i, j] < 8 for i in range(j))}   # 8 = 64 / 8
    changed = {j for j in range(200) if not torch.equal(x[j], old_x[j])}
    assert changed == too_close and 0 < len(changed) <= 5, (changed, too_close)
    assert int(_differences(x).min()) >= 8
    colour, colour_y = make_canaries(1000, (3, 32, 32), 10, seed=0)
    old_colour, old_colour_y = _old_ood(1000, (3, 32, 32), 10, 0)
    assert torch.equal(colour, old_colour) and torch.equal(colour_y, old_colour_y)


def test_too_many_canaries_for_tiny_images_are_refused():
    from audits.canary import ood_canary_problem

    assert ood_canary_problem(200, (1, 8, 8)) is None and ood_canary_problem(100_000, (1, 28, 28)) is None
    assert "5000 canaries cannot differ pairwise" in ood_canary_problem(5000, (1, 4, 4))
    with pytest.raises(ValueError, match="use fewer canaries"):
        make_canaries(5000, (1, 4, 4), 0)


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    """A 2-step run of a 24-image path dataset (npz), for refusals of `dpdm audit` that come before any work."""
    from dpdm.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("npz_run")
    rng = np.random.default_rng(0)
    np.savez(tmp / "d.npz", x=rng.integers(0, 256, (24, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    data = load_dataset(f"npz:{tmp / 'd.npz'}")
    plan = PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=1.0, noise_multiplicity=1,
                       delta=1e-5)
    train(accounting.make_plan_document(plan), data.x, data.y, 3, tmp / "run",
          TrainConfig(model="small", checkpoint_every=2, log_every=1, seed=3), dataset_name=data.name,
          progress=False)
    return tmp / "run"


def test_mislabelled_canaries_of_a_path_dataset_are_refused_before_any_work(npz_run, tmp_path):
    """A path dataset is one split: `load_dataset(name, "test")` gave the training data itself, so the "held-out"
    pool of mislabelled canaries was the background's own images, without a word (stop 47, h91 F5)."""
    from audits.suite import AuditInputError, run_audit

    with pytest.raises(AuditInputError, match="canary_kind='mislabelled' draws its canaries from held-out images, "
                                              r"and dataset='npz:.*d\.npz' has no held-out split"):
        run_audit(npz_run, tmp_path / "audit", suite="quick", seed=0,
                  canary_overrides={"canary_kind": "mislabelled", "num_canaries": 20, "steps": 2,
                                    "background_size": 12})
    assert not (tmp_path / "audit").exists()


def test_a_run_that_names_no_dataset_is_refused_naming_the_parameter(npz_run, tmp_path, monkeypatch):
    """A run of train() without dataset_name: the line said "pass --dataset" to a library caller (h134 F4, stop 53)."""
    import audits.suite
    from audits.suite import run_audit

    real = audits.suite._load_run
    monkeypatch.setattr(audits.suite, "_load_run", lambda run: ({**real(run)[0], "dataset": None}, real(run)[1]))
    with pytest.raises(ValueError, match=r"^the run does not name its dataset; give dataset= \(--dataset\) naming"):
        run_audit(npz_run, tmp_path / "audit", suite="quick", seed=0)
    assert not (tmp_path / "audit").exists()


# Seeds whose fair coins give splits the one-run bound refuses (probability about 1e-6 each; review h96 F2).
REFUSED_COINS = [(200, 1276397, 64), (21, 635125, 0)]


@pytest.mark.parametrize("m, seed, n_in", REFUSED_COINS)
def test_coins_the_one_run_bound_refuses_stop_the_audit_before_any_training(digits, plan_eps1, monkeypatch, m,
                                                                              seed, n_in):
    """Such coins crashed canary_audit after both trainings: KeyError 'one_run' (two classes) or one_run_audit's
    ValueError (one class, m >= 21). They are drawn first, so the audit now refuses them before training."""
    from dataclasses import replace

    import audits.canary as canary

    assert int(draw_inclusion(m, seed).sum()) == n_in

    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing the coins")

    monkeypatch.setattr(canary, "train_with_canaries", no_training)
    with pytest.raises(ValueError, match=rf"^seed={seed}: the coins of this seed cannot be audited \(included has "
                                         rf"{n_in} of {m} canaries in: .* probability .*\); use another seed$"):
        canary_audit(plan_eps1, digits.x, digits.y, 10, replace(CHEAP, num_canaries=m, seed=seed),
                     claimed_epsilon=1.0)


def test_a_report_without_its_one_run_block_is_an_error_naming_the_coins_not_a_key_error(digits, plan_eps1,
                                                                                         monkeypatch):
    """The two-class branch, were refused coins to reach it (coin_split_problem stops them first): the reason
    Auditor.report gives for leaving the one-run block out, not KeyError: 'one_run'."""
    from dataclasses import replace

    import audits.canary as canary

    monkeypatch.setattr(canary, "coin_split_problem", lambda included, seed: None, raising=False)
    with pytest.raises(ValueError, match=r"^seed=1276397: included has 64 of 200 canaries in"):
        canary_audit(plan_eps1, digits.x, digits.y, 10, replace(CHEAP, num_canaries=200, seed=1276397,
                                                                 attacks=("loss",)),
                     claimed_epsilon=1.0, denoiser_factory=tiny_mlp, control=False)


def test_dpdm_audit_refuses_such_coins_as_bad_input_before_any_work(npz_run, tmp_path):
    """`dpdm audit --seed 1276397` (200 canaries, 64 in) is exit 2 with one line naming --seed, before the
    mechanism checks and the report folder, not a traceback and exit 4 after all training."""
    from audits.suite import AuditInputError, run_audit
    from cli.audit import _named_option

    with pytest.raises(AuditInputError, match=r"^seed=1276397: the coins of this seed cannot be audited "
                                              r"\(included has 64 of 200 canaries in") as e:
        run_audit(npz_run, tmp_path / "audit", suite="quick", seed=1276397,
                  canary_overrides={"num_canaries": 200, "steps": 2, "background_size": 12})
    assert not (tmp_path / "audit").exists()
    assert _named_option(str(e.value)).startswith("--seed=1276397: the coins")


def test_canary_scores_that_are_not_finite_beside_finite_weights_are_named():
    """mut57 (stop 54): `_non_finite_problem` checks the canary runs' weights and, given, their canaries' scores
    (a finite model whose loss overflows scores inf): each is a FAIL of the audit (`CanaryNotFinite`), never a crash
    of the attacks' statistics. The weights are checked first."""
    import types

    from audits.canary import _non_finite_problem

    model = torch.nn.Linear(2, 1)
    runs = {"target": types.SimpleNamespace(model=model, info={"steps": 3})}
    assert _non_finite_problem(runs, None) is None
    assert _non_finite_problem(runs, {"target": {"loss": np.array([0.5, 1.0])}}) is None
    problem = _non_finite_problem(runs, {"target": {"loss": np.array([0.5, np.inf, np.nan])}})
    assert problem == ("the loss attack's scores of the canary run's target model are not finite (2 of 3) after 3 "
                       "steps of the plan's private step, though its weights are"), problem
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    assert _non_finite_problem(runs, {"target": {"loss": np.array([0.5, np.inf])}}).startswith(
        "the canary run's target model has non-finite weights (bias) after 3 steps")
