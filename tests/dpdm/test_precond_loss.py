"""Preconditioning and loss: formulas by hand, K-averaging by loop, purity under vmap."""

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from dpdm.loss import EDMLoss, VLoss, drop_labels, engine_loss_fn
from dpdm.networks import build_network
from dpdm.precond import EDMPrecond, VPrecond
from dpdm.train import training_loss




class Recorder(torch.nn.Module):
    """Raw network F that records its inputs and returns a fixed function of them."""

    num_classes = 3
    img_resolution = 4
    img_channels = 1

    def forward(self, x, c_noise, class_labels):
        self.seen = (x, c_noise, class_labels)
        return torch.tanh(x) + c_noise.reshape(-1, 1, 1, 1)


def test_edm_precond_matches_table_1_by_hand():
    sd = 0.7
    D = EDMPrecond(Recorder(), sigma_data=sd)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigmas = [0.01, 0.9, 50.0]
    out = D(x, torch.tensor(sigmas, dtype=torch.float64))
    for i, s in enumerate(sigmas):
        c_skip = sd * sd / (s * s + sd * sd)
        c_out = s * sd / math.sqrt(s * s + sd * sd)
        c_in = 1 / math.sqrt(s * s + sd * sd)
        c_noise = math.log(s) / 4
        expected = c_skip * x[i] + c_out * (torch.tanh(c_in * x[i]) + c_noise)
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)
        assert D.net.seen[1][i].item() == pytest.approx(c_noise, rel=1e-12)
    assert D.sigma_data == sd and D.num_classes == 3


def test_edm_default_sigma_data_is_dpdm():
    assert EDMPrecond(Recorder()).sigma_data == pytest.approx(math.sqrt(1 / 3))
    assert EDMLoss().sigma_data == pytest.approx(math.sqrt(1 / 3))
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(Recorder(), sigma_data=0.0)


def test_v_precond_matches_by_hand():
    D = VPrecond(Recorder())
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigmas = [0.002, 1.0, 80.0]
    out = D(x, torch.tensor(sigmas, dtype=torch.float64))
    for i, s in enumerate(sigmas):
        t = 2 / math.pi * math.acos(1 / math.sqrt(1 + s * s))   # DPDM's VDenoiser._sigma_inv
        expected = x[i] / (s * s + 1) + s / math.sqrt(1 + s * s) * (torch.tanh(x[i] / math.sqrt(1 + s * s)) + t)
        torch.testing.assert_close(out[i], expected, rtol=1e-10, atol=1e-10)
        assert math.tan(math.pi * D.net.seen[1][i].item() / 2) == pytest.approx(s, rel=1e-9)


def test_scalar_sigma_broadcasts():
    D = EDMPrecond(Recorder())
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(D(x, 0.5), D(x, torch.full((2,), 0.5)))


def test_edm_draw_is_lognormal():
    L = EDMLoss(P_mean=-1.2, P_std=1.2)
    g = torch.Generator().manual_seed(0)
    sigma, noise = L.draw(2000, 4, (1, 2, 2), generator=g)
    assert sigma.shape == (2000, 4) and noise.shape == (2000, 4, 1, 2, 2)
    log_s = sigma.log()
    assert abs(log_s.mean().item() + 1.2) < 0.05 and abs(log_s.std().item() - 1.2) < 0.05
    assert abs(noise.std().item() - 1) < 0.02
    # Same generator seed, same draw; an empty batch works.
    s2, n2 = L.draw(2000, 4, (1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sigma, s2) and torch.equal(noise, n2)
    s0, n0 = L.draw(0, 4, (1, 2, 2))
    assert s0.shape == (0, 4) and n0.shape == (0, 4, 1, 2, 2)


def test_v_draw_range_and_uniform_t():
    L = VLoss()
    sigma, _ = L.draw(5000, 2, (1, 2, 2), generator=torch.Generator().manual_seed(1))
    logsnr = -2 * sigma.double().log()
    assert logsnr.min() >= -9 - 1e-4 and logsnr.max() <= 13 + 1e-4
    t = 2 / math.pi * torch.atan(sigma.double())
    u = (t - L.t_min) / (L.t_max - L.t_min)
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.005


def test_each_examples_K_draws_are_independent():
    """h92 F1: K is the paper's multiplicity trick; an example's K (sigma, noise) draws must be K
    independent draws, not one draw repeated (which would pass every moment test and cost K times the
    compute for the gradient of K = 1), and different examples must get different draws."""
    for L in (EDMLoss(), VLoss()):
        B, K = 2000, 4
        sigma, noise = L.draw(B, K, (1, 2, 2), generator=torch.Generator().manual_seed(5))
        log_s = sigma.double().log()                                  # [B, K]
        flat = noise.double().reshape(B, K, -1)                       # [B, K, 4]
        for j in range(K):
            for k in range(j + 1, K):
                assert (sigma[:, j] != sigma[:, k]).all(), (type(L).__name__, j, k)
                assert (flat[:, j] != flat[:, k]).any(1).all(), (type(L).__name__, j, k)
                r_s = torch.corrcoef(torch.stack([log_s[:, j], log_s[:, k]]))[0, 1].item()
                r_n = torch.corrcoef(torch.stack([flat[:, j].flatten(), flat[:, k].flatten()]))[0, 1].item()
                # Independent: |r| ~ 1/sqrt(n) = 0.022 (sigma) and 0.011 (noise); a shared draw gives 1.
                assert abs(r_s) < 0.1 and abs(r_n) < 0.1, (type(L).__name__, j, k, r_s, r_n)
        # Across examples: no two share their K sigmas, and consecutive examples' noise is uncorrelated.
        assert torch.unique(sigma, dim=0).shape[0] == B
        r_ex = torch.corrcoef(torch.stack([flat[:-1].flatten(), flat[1:].flatten()]))[0, 1].item()
        assert abs(r_ex) < 0.05, r_ex


def _logsnr_t(logsnr):
    """t(lambda) = (2/pi) arctan(sigma), sigma = exp(-lambda/2), written out here, not taken from VLoss."""
    return 2 / math.pi * math.atan(math.exp(-logsnr / 2))


def test_default_training_sigma_is_designs():
    """h92 F2: DESIGN.md fixes `dpdm train`'s noise levels: ln sigma ~ N(-1.2, 1.2^2) for EDM, and the
    v-prediction log-SNR range [-9, 13] (sigma 0.0015 to 90) where --train-sigma is not given. Checked on
    the losses `dpdm train` builds (`training_loss`) and on the defaults of the constructors, by their
    draws (not only by attributes that a draw might ignore)."""
    for L in (EDMLoss(), EDMLoss(sigma_data=0.5), training_loss("edm", None, 0.5)):
        assert (L.P_mean, L.P_std) == (-1.2, 1.2)
        sigma, _ = L.draw(5000, 4, (1, 1, 1), generator=torch.Generator().manual_seed(3))
        log_s = sigma.double().log().flatten()                        # 20000 draws; std error 0.008
        assert abs(log_s.mean().item() + 1.2) < 0.04 and abs(log_s.std().item() - 1.2) < 0.04
        # Normal, not only the right moments: the quantiles at -1, 0 and +1 std.
        for z, q in ((-1.0, 0.1587), (0.0, 0.5), (1.0, 0.8413)):
            assert abs((log_s < -1.2 + 1.2 * z).double().mean().item() - q) < 0.015, z
    t_lo, t_hi = _logsnr_t(13.0), _logsnr_t(-9.0)
    for L in (VLoss(), training_loss("v", None, 0.5)):
        assert (L.logsnr_min, L.logsnr_max) == (-9.0, 13.0)
        assert L.t_min == pytest.approx(t_lo, rel=1e-12) and L.t_max == pytest.approx(t_hi, rel=1e-12)
        sigma, _ = L.draw(5000, 4, (1, 1, 1), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        logsnr = -2 * sigma.log()
        # Inside [-9, 13] and reaching near both ends (expected ~90 draws below -8 and ~12 above 12).
        assert logsnr.min() >= -9 - 1e-9 and logsnr.max() <= 13 + 1e-9
        assert logsnr.min() < -8 and logsnr.max() > 12, (logsnr.min(), logsnr.max())
        # t uniform over the contract's range (not over the object's own t_min, t_max).
        u = (2 / math.pi * torch.atan(sigma) - t_lo) / (t_hi - t_lo)
        assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003


@pytest.mark.parametrize("sigma_min", [1e-10, 1e-9, 1e-8, 1e-7, 1e-4])
def test_v_tiny_sigma_min_is_exact(sigma_min, monkeypatch):
    """h92 N1: DPDM's arccos(1/sqrt(1 + e^-lambda)) rounds to t = 0 for sigma_min <= 1e-8, so sigma = 0 (an
    infinite loss weight) became reachable and the lowest sigma of 1e-7 was 1.2% off. --train-sigma
    accepts down to 1e-10 (SIGMA_LIMITS)."""
    L = VLoss.from_sigma_range(sigma_min, 1e10)
    assert L.t_min > 0
    assert math.tan(math.pi * L.t_min / 2) == pytest.approx(sigma_min, rel=1e-12)
    assert math.tan(math.pi * L.t_max / 2) == pytest.approx(1e10, rel=1e-5)   # t near 1: float64's limit
    # The draw's lowest level (u = 0) is sigma_min, with a finite weight, in float32 too.
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    for dtype in (torch.float32, torch.float64):
        sigma, _ = L.draw(3, 2, (1, 1, 1), dtype=dtype)
        assert sigma.dtype == dtype
        torch.testing.assert_close(sigma, torch.full((3, 2), sigma_min, dtype=dtype), rtol=1e-6, atol=0)
        assert torch.isfinite(L.weight(sigma)).all()


def test_t_of_logsnr_matches_dpdms_form_where_that_is_exact():
    """The arctan form equals DPDM's arccos form away from its cancellation, and never overflows."""
    for lam in (-46.0, -20.0, -9.0, -1.0, -1e-9, 0.0, 1e-9, 1.0, 5.0):
        dpdm_t = 2 / math.pi * math.acos(1 / math.sqrt(1 + math.exp(-lam)))
        assert VLoss.t_of_logsnr(lam) == pytest.approx(dpdm_t, rel=1e-12, abs=1e-15), lam
    assert VLoss.t_of_logsnr(0.0) == 0.5
    assert VLoss.t_of_logsnr(-5000.0) == 1.0 and VLoss.t_of_logsnr(5000.0) == 0.0


def test_weights():
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    sd = 3**-0.5
    torch.testing.assert_close(EDMLoss().weight(s), (s**2 + sd**2) / (s * sd) ** 2)
    torch.testing.assert_close(VLoss().weight(s), (s**2 + 1) / s**2)


@pytest.mark.parametrize("loss_cls,precond_cls", [(EDMLoss, EDMPrecond), (VLoss, VPrecond)])
def test_loss_equals_manual_loop_over_K(loss_cls, precond_cls):
    torch.manual_seed(0)
    net = build_network("small", img_resolution=8, img_channels=1, num_classes=3, init_scale=1.0).double()
    D = precond_cls(net)
    L = loss_cls()
    B, K = 3, 4
    x = torch.rand(B, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 3, 2])
    sigma, noise = L.draw(B, K, (1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = L(D, x, y, sigma, noise)
    assert out.shape == (B,)
    for i in range(B):
        per_k = []
        for k in range(K):
            s = sigma[i, k]
            den = D(x[i : i + 1] + s * noise[i, k][None], s.reshape(1), y[i : i + 1])
            per_k.append((L.weight(s) * (den - x[i : i + 1]) ** 2).mean())
        assert out[i].item() == pytest.approx(torch.stack(per_k).mean().item(), rel=1e-10)


def test_loss_is_vmappable_and_matches_loop():
    """Per-example gradients by vmap(grad) of engine_loss_fn equal a loop of autograd."""
    torch.manual_seed(0)
    net = build_network("small", img_resolution=8, img_channels=1, num_classes=10, init_scale=1.0).double()
    D = EDMPrecond(net)
    L = EDMLoss()
    B, K = 3, 2
    x = torch.rand(B, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = drop_labels(torch.tensor([1, 2, 3]), 0.5, 10, generator=torch.Generator().manual_seed(0))
    sigma, noise = L.draw(B, K, (1, 8, 8), dtype=torch.float64)
    loss_fn = engine_loss_fn(L)
    params = {k: v.detach() for k, v in D.named_parameters()}

    def one(p, *ex):
        return loss_fn(lambda *a: functional_call(D, p, a), *(t[None] for t in ex))

    losses = vmap(one, in_dims=(None, 0, 0, 0, 0))(params, x, y, sigma, noise)
    grads = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(params, x, y, sigma, noise)
    torch.testing.assert_close(losses, L(D, x, y, sigma, noise), rtol=1e-10, atol=0)
    for i in range(B):
        D.zero_grad()
        loss_fn(D, x[i : i + 1], y[i : i + 1], sigma[i : i + 1], noise[i : i + 1]).backward()
        bad = [k for k, p in D.named_parameters() if not torch.allclose(grads[k][i], p.grad, rtol=1e-8, atol=1e-12)]
        assert not bad, f"example {i}: mismatching grads for {bad}"
        assert all(p.grad.abs().sum() > 0 for k, p in D.named_parameters() if k != "net.label_embed.weight")


def test_unconditional_engine_loss_fn_under_vmap():
    net = build_network("small", img_resolution=8, img_channels=3, num_classes=0, init_scale=1.0)
    D = VPrecond(net)
    L = VLoss()
    x = torch.randn(2, 3, 8, 8)
    sigma, noise = L.draw(2, 3, (3, 8, 8))
    loss_fn = engine_loss_fn(L, conditional=False)
    params = {k: v.detach() for k, v in D.named_parameters()}
    one = lambda p, *ex: loss_fn(lambda *a: functional_call(D, p, a), *(t[None] for t in ex))  # noqa: E731
    losses = vmap(one, in_dims=(None, 0, 0, 0))(params, x, sigma, noise)
    torch.testing.assert_close(losses, L(D, x, None, sigma, noise), rtol=1e-5, atol=1e-6)


def test_drop_labels():
    y = torch.arange(10).repeat(1000)
    out = drop_labels(y, 0.1, 10, generator=torch.Generator().manual_seed(0))
    dropped = out == 10
    assert torch.equal(out[~dropped], y[~dropped])
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert (drop_labels(y, 1.0, 10) == 10).all()
    assert drop_labels(None, 0.1, 10) is None
    with pytest.raises(ValueError, match="p=1.5"):
        drop_labels(y, 1.5, 10)


def test_draw_validates():
    with pytest.raises(ValueError, match="K=0"):
        EDMLoss().draw(2, 0, (1, 8, 8))
    with pytest.raises(ValueError, match="logsnr_min"):
        VLoss(logsnr_min=5, logsnr_max=1)
