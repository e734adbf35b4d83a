"""torch.distributed (gloo, two processes on CPU): the mechanism stays the plan's.

The tests spawn real processes: two ranks each computing clipped sums on a disjoint shard, and
`torchrun --standalone --nproc_per_node=2 -m cli.main train ...` end to end.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.multiprocessing as mp

import accounting
from dpdm import checkpoint as ckpt

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _torchrun_temp_files_in_tmp_path(tmp_path, monkeypatch):
    """torchrun's agent leaves an empty /tmp/torchelastic_* folder per launch: its children get this test's folder."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


# --- helpers run inside spawned ranks ------------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3)).double()


def _loss_fn(model, x, y):
    # K = 2 draws inside one example, averaged (as the diffusion loss does).
    out = model(x.repeat(2, 1))
    return ((out - y.repeat(2, 1)) ** 2).mean()


def _zero_loss_fn(model, x, y):
    return sum((p * 0).sum() for p in model.parameters()) + 0 * x.sum()


def _batch(n=20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64) * 3, torch.randn(n, 3, generator=g, dtype=torch.float64)


def _rank_main(rank, world, init_file, out_dir, task):
    import torch.distributed as dist

    from dpdm.train import _Dist, distributed_private_grad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    done = False
    try:
        d = _Dist.current()
        model = _tiny_model()
        x, y = _batch()
        idx = torch.arange(len(x))
        local = d.shard(idx)
        if task == "sum":
            g = distributed_private_grad(model, _loss_fn, x[local], y[local], clip_norm=1.0, noise_multiplier=0.0,
                                         expected_batch_size=1.0, noise_seed=0, dist=d)
            if rank == 0:
                torch.save({k: v.detach() for k, v in g.items()}, Path(out_dir) / "sum.pt")
        elif task == "plan_sum":   # what the training loop calls, with the plan's divisor (noise off)
            import types

            from dpdm.train import plan_private_grad
            plan = types.SimpleNamespace(clip_norm=1.0, noise_multiplier=0.0, batch_size=8)
            g = plan_private_grad(model, _loss_fn, (x[local], y[local]), plan, seed=0, step=0, dist=d)
            torch.save({k: v.detach() for k, v in g.items()}, Path(out_dir) / f"plan_sum{rank}.pt")
        elif task == "noise":   # in the full space, then on the --public-subspace path with rank 0's basis
            for name, basis in (("noise", None), ("basis_noise", _rank_basis(0, sum(p.numel() for p in
                                                                                    model.parameters())))):
                samples = []
                for step in range(200):
                    g = distributed_private_grad(model, _zero_loss_fn, x[local], y[local], clip_norm=0.5,
                                                 noise_multiplier=2.0, expected_batch_size=10.0,
                                                 noise_seed=1000 + step, dist=d, basis=basis)
                    samples.append(torch.cat([v.reshape(-1) for v in g.values()]))
                torch.save(torch.stack(samples), Path(out_dir) / f"{name}{rank}.pt")
        elif task == "basis":
            _basis_task(rank, d, model, x[local], y[local], out_dir)
        elif task == "basis_fails":
            _basis_task(rank, d, model, x[local], y[local], out_dir, fails=True)
        dist.barrier()  # let the peer finish before tearing gloo down
        done = True
    finally:
        dist.destroy_process_group()
    if done:
        # The results are on disk. Skip the interpreter's teardown: once (stop 26, a busy CPU) a rank
        # aborted there in gloo's C++ threads ("terminate called without an active exception") after
        # its work was done, which fails the spawn with nothing wrong in what it computed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _rank_basis(rank, d, k=3):
    """An orthonormal [d, k] basis that differs between ranks (as nondeterministic GPU kernels could make it)."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def _basis_task(rank, d, model, x, y, out_dir, fails=False):
    import types

    import dpdm.train as train_mod
    from dpdm.engine import SubspaceSpanError

    n_params = sum(p.numel() for p in model.parameters())
    calls = []

    def own_estimate(*a, **kw):   # this rank's own estimate (or, with `fails`, none)
        calls.append(rank)
        if fails:
            raise SubspaceSpanError("the public gradients span fewer than 3 directions; lower the dimension")
        return _rank_basis(rank, n_params)

    train_mod.public_subspace = own_estimate
    loss_obj = types.SimpleNamespace(draw=lambda n, K, shape, generator: (torch.ones(n), torch.zeros(n, K, *shape)))
    config = types.SimpleNamespace(subspace_examples=4, subspace_dim=3, physical_batch=None, per_layer_rules=None,
                                   label_dropout=0.1)
    try:
        basis = train_mod._public_basis(model, loss_obj, _loss_fn, (x, y), config, False, 1, 1, 1.0, 0,
                                        torch.device("cpu"), d)
    except train_mod.TrainError as e:
        (Path(out_dir) / f"basis_error{rank}.txt").write_text(f"{calls} {e}")
        return
    assert calls == ([0] if rank == 0 else [])    # rank 0 alone computes it
    g = train_mod.distributed_private_grad(model, _loss_fn, x, y, clip_norm=1.0, noise_multiplier=0.0,
                                           expected_batch_size=1.0, noise_seed=0, dist=d, basis=basis)
    torch.save({"basis": basis, "update": torch.cat([v.reshape(-1) for v in g.values()])},
               Path(out_dir) / f"basis{rank}.pt")


def _spawn(tmp_path, task, world=2):
    init_file = tmp_path / "pg_init"
    mp.start_processes(_rank_main, args=(world, str(init_file), str(tmp_path), task), nprocs=world,
                       join=True, start_method="spawn")


def test_allreduced_clipped_sum_equals_single_process(tmp_path):
    from dpdm.engine import clipped_grad_sum

    _spawn(tmp_path, "sum")
    two = torch.load(tmp_path / "sum.pt", weights_only=True)
    model = _tiny_model()
    x, y = _batch()
    one = clipped_grad_sum(model, _loss_fn, x, y, clip_norm=1.0)
    assert set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k], one[k].detach(), rtol=1e-6, atol=1e-9)


def test_two_ranks_divide_the_summed_gradient_by_the_plans_whole_expected_batch(tmp_path):
    """The training loop's own call (plan_private_grad) on 2 ranks: the sum over both shards divided by the plan's
    expected batch, not by a rank's share of it. Adam hides a constant factor, so the end-to-end run equalled one
    rank's to 4e-6 with every rank dividing by batch / 2 (stop 42)."""
    from dpdm.engine import clipped_grad_sum

    _spawn(tmp_path, "plan_sum")
    model = _tiny_model()
    x, y = _batch()
    want = clipped_grad_sum(model, _loss_fn, x, y, clip_norm=1.0)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"plan_sum{rank}.pt", weights_only=True)
        for k in want:
            torch.testing.assert_close(got[k], want[k].detach() / 8, rtol=1e-6, atol=1e-9)


def test_ranks_project_with_rank_zeros_public_basis(tmp_path):
    """Each rank projects its own clipped sum and only rank 0's noise lies in the subspace; a rank projecting
    onto a basis of its own would add noise-free directions to the update. So every rank takes rank 0's."""
    _spawn(tmp_path, "basis")
    r0, r1 = (torch.load(tmp_path / f"basis{r}.pt", weights_only=True) for r in (0, 1))
    n_params = sum(p.numel() for p in _tiny_model().parameters())
    torch.testing.assert_close(r1["basis"], _rank_basis(0, n_params), rtol=0, atol=0)
    torch.testing.assert_close(r0["basis"], _rank_basis(0, n_params), rtol=0, atol=0)
    torch.testing.assert_close(r0["update"], r1["update"], rtol=0, atol=0)
    B = r0["basis"]
    outside = r0["update"] - B @ (B.T @ r0["update"])
    assert float(outside.norm()) < 1e-12 * float(r0["update"].norm())


def test_rank_zeros_subspace_error_stops_every_rank_at_once(tmp_path):
    _spawn(tmp_path, "basis_fails")
    errors = [(tmp_path / f"basis_error{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == "[0] subspace_dim=3 (--public-subspace): the public gradients span fewer than 3 directions; " \
                        "lower the dimension"
    assert errors[1] == "[] subspace_dim=3 (--public-subspace): rank 0 could not compute the public subspace (its " \
                        "own line says why)"


@pytest.fixture(scope="module")
def noise_draws(tmp_path_factory):
    """The folder of the "noise" task's draws, full space and subspace: one spawn (most of the time) for both tests."""
    d = tmp_path_factory.mktemp("noise")
    _spawn(d, "noise")
    return d


def test_two_rank_noise_is_drawn_once_with_the_plans_variance(noise_draws):
    n0 = torch.load(noise_draws / "noise0.pt", weights_only=True)
    n1 = torch.load(noise_draws / "noise1.pt", weights_only=True)
    torch.testing.assert_close(n0, n1, rtol=0, atol=0)  # every rank applies the same update
    expected_std = 2.0 * 0.5 / 10.0
    z = (n0.numpy().ravel() / expected_std)
    stat = float((z ** 2).sum())
    dof = z.size
    p = 2 * min(scipy.stats.chi2.cdf(stat, dof), scipy.stats.chi2.sf(stat, dof))
    assert p > 1e-6, f"noise variance off: chi2={stat:.1f} dof={dof} p={p:.2e}"
    # Noise added on both ranks would double the variance: the test sees that.
    stat2 = float(((z * np.sqrt(2)) ** 2).sum())
    assert 2 * scipy.stats.chi2.sf(stat2, dof) < 1e-6


def test_two_rank_subspace_noise_is_drawn_once_with_the_plans_variance(noise_draws):
    """The noise test above on the --public-subspace path (`add_noise_in_subspace` on rank 0 alone). Only the slow
    end-to-end run saw this path's noise on 2 ranks, so `make test` passed with rank 0 adding half of it
    (noise_multiplier / world_size), which changes nothing on one rank (h86, stop 46). The update must lie in the
    basis' span, be the same on both ranks, and its k coordinates there must have the variance (sigma C / B)^2."""
    n0 = torch.load(noise_draws / "basis_noise0.pt", weights_only=True)   # [steps, d]
    n1 = torch.load(noise_draws / "basis_noise1.pt", weights_only=True)
    torch.testing.assert_close(n0, n1, rtol=0, atol=0)  # every rank applies the same update
    basis = _rank_basis(0, n0.shape[1])   # [d, k]
    coords = n0 @ basis   # [steps, k]
    outside = n0 - coords @ basis.T
    assert float(outside.norm()) < 1e-12 * float(n0.norm())   # no noise-free direction
    expected_std = 2.0 * 0.5 / 10.0
    z = coords.numpy().ravel() / expected_std
    stat, dof = float((z ** 2).sum()), z.size
    p = 2 * min(scipy.stats.chi2.cdf(stat, dof), scipy.stats.chi2.sf(stat, dof))
    assert p > 1e-6, f"subspace noise variance off: chi2={stat:.1f} dof={dof} p={p:.2e}"
    # Half the noise (noise_multiplier / 2 on 2 ranks) and noise on both ranks (twice the variance) would be seen.
    for factor in (0.5, np.sqrt(2)):
        scaled = float(((z * factor) ** 2).sum())
        assert 2 * min(scipy.stats.chi2.cdf(scaled, dof), scipy.stats.chi2.sf(scaled, dof)) < 1e-6


# --- torchrun end to end ----------------------------------------------------------------------------

def _write_tiny_dataset(path: Path, n=24, res=8):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 1, res, res), dtype=np.uint8)
    y = (np.arange(n) % 3).astype(np.int64)
    np.savez(path, x=x, y=y)


def _write_plan(path: Path, n=24, steps=6):
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=8, steps=steps, noise_multiplier=1.5, clip_norm=1.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name="tiny")
    accounting.write_plan(accounting.make_plan_document(plan), path)
    return plan


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DPDM_DIST_TIMEOUT="60", **extra)
    return env


def _train_cmd(nproc, plan, data, out, *extra):
    args = ["train", "--plan", str(plan), "--dataset", f"npz:{data}", "--out", str(out), "--device", "cpu",
            "--checkpoint-every", "2", "--seed", "5", "--quiet", *extra]
    if nproc == 1:
        return [sys.executable, "-m", "cli.main", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cli.main", *args]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    _write_tiny_dataset(d / "data.npz")
    plan = _write_plan(d / "plan.json")
    return d, plan


def test_two_rank_run_matches_plan_and_single_rank(tiny):
    d, plan = tiny
    r2 = subprocess.run(_train_cmd(2, d / "plan.json", d / "data.npz", d / "two", "--json"),
                        env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    import json

    summary = json.loads(r2.stdout)  # rank 0 alone prints, one document
    assert summary["steps_done"] == plan.steps and summary["private"] is True
    state = ckpt.load_checkpoint(d / "two" / "checkpoint.pt")
    assert state["ledger"]["steps_done"] == plan.steps
    assert state["ledger"]["epsilon_spent"] == pytest.approx(accounting.epsilon_spent(plan, plan.steps))
    r1 = subprocess.run(_train_cmd(1, d / "plan.json", d / "data.npz", d / "one"),
                        env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r1.returncode == 0, r1.stderr[-3000:]
    one = ckpt.load_checkpoint(d / "one" / "checkpoint.pt")["model"]
    for k, v in state["model"].items():
        torch.testing.assert_close(v, one[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # 17 s; test_ranks_project_with_rank_zeros_public_basis is the check
def test_two_rank_subspace_run_matches_single_rank(tiny):
    """--public-subspace under torchrun runs end to end and is the single process's run (plumbing: on a CPU every
    rank's basis is the same anyway; test_ranks_project_with_rank_zeros_public_basis checks that rank 0's is used)."""
    d, _ = tiny
    rng = np.random.default_rng(7)
    np.savez(d / "public.npz", x=rng.integers(0, 256, size=(16, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(16) % 3).astype(np.int64))
    extra = ("--public-subspace", "3", "--subspace-data", f"npz:{d / 'public.npz'}", "--subspace-every", "2",
             "--subspace-examples", "8")
    runs = {}
    for nproc in (2, 1):
        out = d / f"sub{nproc}"
        r = subprocess.run(_train_cmd(nproc, d / "plan.json", d / "data.npz", out, *extra),
                           env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[nproc] = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert runs[2]["config"]["train"]["subspace_dim"] == 3
    for k, v in runs[2]["model"].items():
        torch.testing.assert_close(v, runs[1]["model"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_dead_rank_stops_run_checkpoint_valid_and_resumes_on_one_rank(tiny):
    d, plan = tiny
    out = d / "dies"
    r = subprocess.run(_train_cmd(2, d / "plan.json", d / "data.npz", out),
                       env=_env(DPDM_FAULT_INJECT="1:3"), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0
    state = ckpt.load_checkpoint(out / "checkpoint.pt")  # the last checkpoint is valid
    assert state["ledger"]["steps_done"] == 2
    # Steps 3 ran past it (rank 0's record): both ranks refuse another lr, on rank 0's verdict (stop 52).
    r = subprocess.run(_train_cmd(2, d / "plan.json", d / "data.npz", out, "--resume", "--lr", "1e-3"),
                       env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dpdm: error:")]
    assert r.returncode != 0 and "exitcode: 2" in r.stderr and len(lines) == 2, r.stderr[-3000:]   # one per rank
    assert any("the run trained step 3 after its checkpoint of step 2" in ln for ln in lines), r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("torch/distributed/elastic")[0]   # torchrun's own report follows
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["ledger"] == state["ledger"]
    r = subprocess.run(_train_cmd(1, d / "plan.json", d / "data.npz", out, "--resume", "--json"),
                       env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    state = ckpt.load_checkpoint(out / "checkpoint.pt")
    assert state["ledger"]["steps_done"] == plan.steps


def test_two_ranks_share_the_secret_seed_and_so_the_poisson_batch(tiny):
    """Without --seed, rank 0 draws the secret seed and broadcasts it: every rank must sample the same
    Poisson batch and take its shard of it. If each rank kept its own draw, the all-reduced count (the sum
    of the shards) would not be the size of the batch that the recorded seed derives."""
    import csv

    from dpdm.data import PoissonSampler

    d, plan = tiny
    out = d / "secret"
    cmd = [a for a in _train_cmd(2, d / "plan.json", d / "data.npz", out, "--log-every", "1")]
    i = cmd.index("--seed")
    del cmd[i:i + 2]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    seed = int(ckpt.load_checkpoint(out / "checkpoint.pt")["config"]["train"]["seed"])
    sampler = PoissonSampler(plan.dataset_size, plan.sample_rate, seed)
    with open(out / "metrics.csv", newline="") as f:
        logged = [int(row["batch_size"]) for row in csv.DictReader(f)]
    want = [len(sampler.batch(s)) for s in range(plan.steps)]
    assert logged == want, (logged, want)


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_ranks_with_another_plan_or_data_are_refused_before_training(tiny):
    """Each rank reads its own plan and data, and clips with its own plan's clip norm, while rank 0's plan alone
    sizes the noise and the ledger. A rank 1 given a plan with clip norm 100 trained to the end (exit 0) with the
    ledger's epsilon false, and one given other images of the same size trained on them. Every rank now compares
    the plan, the data and the options first, and each refuses in one line, exit 2, before any file is written."""
    d, plan = tiny
    other = accounting.PrivacyPlan(dataset_size=plan.dataset_size, batch_size=plan.batch_size, steps=plan.steps,
                                   noise_multiplier=plan.noise_multiplier, clip_norm=100.0,
                                   noise_multiplicity=plan.noise_multiplicity, delta=plan.delta, dataset_name="tiny")
    accounting.write_plan(accounting.make_plan_document(other), d / "plan_clip100.json")
    with np.load(d / "data.npz") as f:
        np.savez(d / "data_inverted.npz", x=255 - f["x"], y=f["y"])
    entry = d / "rank1_other.py"   # rank 1 gets the arguments after '--rank1'
    entry.write_text("import os, sys\nfrom cli.main import main\nargs = sys.argv[1:]\ni = args.index('--rank1')\n"
                     "args = args[i + 1:] if os.environ['RANK'] == '1' else args[:i]\nsys.exit(main(args))\n")
    for name, swap, want in (("clip", ("plan.json", "plan_clip100.json"), "the plan"),
                             ("data", ("data.npz", "data_inverted.npz"), "the data")):
        out = d / f"mismatch_{name}"
        cmd = _train_cmd(2, d / "plan.json", d / "data.npz", out)
        args = cmd[cmd.index("cli.main") + 1:]
        rank1 = [a.replace(*swap) if a.endswith(swap[0]) else a for a in args]
        assert rank1 != args
        cmd = [*cmd[:cmd.index("-m", 2)], str(entry), *args, "--rank1", *rank1]
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode != 0, r.stderr[-3000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dpdm: error:")]
        assert len(lines) == 2 and lines[0] == lines[1], r.stderr[-3000:]   # one line from each rank
        assert lines[0] == (f"dpdm: error: the ranks differ in {want}: every rank must train with the same plan, "
                            "data and options (nothing was written)")
        ranks = r.stderr.split("torch/distributed/elastic")[0]   # torchrun's own report follows, traceback included
        assert "Traceback" not in ranks and "exitcode: 2" in r.stderr and not out.exists(), r.stderr[-3000:]
    # A rank that refuses its own input (20 images for a 24-image plan) left its peer a gloo traceback, exit 4.
    with np.load(d / "data.npz") as f:
        np.savez(d / "data_short.npz", x=f["x"][:20], y=f["y"][:20])
    out = d / "mismatch_short"
    cmd = _train_cmd(2, d / "plan.json", d / "data.npz", out)
    args = cmd[cmd.index("cli.main") + 1:]
    rank1 = [a.replace("data.npz", "data_short.npz") for a in args]
    r = subprocess.run([*cmd[:cmd.index("-m", 2)], str(entry), *args, "--rank1", *rank1], env=_env(),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = sorted(ln for ln in r.stderr.splitlines() if ln.startswith("dpdm: "))
    assert lines == ["dpdm: error: another rank stopped before the first step (its own line says why); nothing was "
                     "written", "dpdm: error: the data has 20 examples but the plan was made for dataset_size=24; a "
                     "plan is valid only for data of its size: make one for this data (`dpdm plan ... "
                     "--dataset-size 20`; nothing has trained under it, so it costs nothing)"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("torch/distributed/elastic")[0] and not out.exists()


@pytest.mark.parametrize("env, said", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set, but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not: run under "
                          "torchrun"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a number of processes"),
    ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "RANK=5 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "RANK=2 is not below WORLD_SIZE=2"),
    *[({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
        "DPDM_DIST_TIMEOUT": t}, f"DPDM_DIST_TIMEOUT={t!r} must be a number of seconds above 0 (default 600)")
      for t in ("abc", "nan", "inf", "0", "-1")],
    ({"RANK": "1"}, "RANK=1 is set, but WORLD_SIZE is not: run the ranks under torchrun"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
])
def test_a_stray_world_size_is_one_line(tiny, monkeypatch, capsys, env, said):
    """WORLD_SIZE left in the shell, outside torchrun: torch's env:// rendezvous raised ("environment variable
    RANK expected, but not set"), a traceback and exit 4; now one line, exit 2, before the run folder is made.
    So do a DPDM_DIST_TIMEOUT that is no number of seconds (a ValueError traceback, exit 4), and a RANK above 0
    with no world for it (the run trained alone, then printed nothing, not even --json). A rank let through would
    wait at the rendezvous: init_process_group fails the test at once instead."""
    from cli.main import main

    d, _ = tiny

    def unreachable(*args, **kwargs):
        raise AssertionError("reached past the refusal")

    monkeypatch.setattr(torch.distributed, "init_process_group", unreachable)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc = main(["train", "--plan", str(d / "plan.json"), "--dataset", f"npz:{d / 'data.npz'}", "--out",
               str(d / "stray"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"dpdm: error: {said}"), err
    assert not (d / "stray").exists()


def test_a_collective_whose_peer_died_is_one_runtime_line(monkeypatch):
    """Ranks started by a scheduler (RANK, WORLD_SIZE: no torchrun agent to stop the others) got 39 lines of gloo's
    traceback when a peer died mid-run, and nothing said that --resume goes on (stop 42): every collective of the
    loop now raises RankLost, which `dpdm train` prints as one line, exit 4."""
    import torch.distributed as tdist

    from dpdm.train import RankLost, _Dist

    def closed(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer\n"
                           "[127.0.0.1]:31623")

    for name in ("all_reduce", "broadcast", "all_gather"):
        monkeypatch.setattr(tdist, name, closed)
    d = _Dist(rank=0, world_size=2, training=True, last_saved=4)
    model = torch.nn.Linear(2, 1)
    for call in (lambda: d.all_reduce_({"w": torch.zeros(3)}), lambda: d.all_reduce_scalars([1.0]),
                 lambda: d.broadcast_int(3), lambda: d.broadcast_(torch.zeros(2)),
                 lambda: d.check_same_params(model)):
        with pytest.raises(RankLost, match=r"^another rank stopped during training \(its own output says why; here: "
                                           r"RuntimeError: \[.*Connection closed by peer \[127.0.0.1\]:31623\); the "
                                           r"run's checkpoint of step 4 is whole, and `dpdm train --resume` continues "
                                           r"from it$"):
            call()
    # What the line says of the run folder (h114 F3, stop 51). Rank 0 writes the checkpoints; another rank counts
    # one as saved once the ranks checked it, which is before rank 0 has written it (a full disk may stop rank 0).
    for dist, said in ((_Dist(rank=0, world_size=2), r"before the first step (.*); no checkpoint was saved: run the "
                                                     r"same command again \(`--resume` has nothing to resume\)$"),
                       (_Dist(rank=1, world_size=2, last_saved=4), r"before the first step (.*); the run's checkpoint "
                                                                   r"of step 4 is whole"),   # a resume's
                       (_Dist(rank=1, world_size=2, training=True), r"during training (.*); no checkpoint was saved"),
                       (_Dist(rank=1, world_size=2, training=True, last_saved=4),
                        r"during training (.*); `dpdm train --resume` continues from the run's last checkpoint, that "
                        r"of step 4 unless rank 0 stopped while writing it \(rank 0's output says\)$")):
        with pytest.raises(RankLost, match=f"^another rank stopped {said}"):
            dist.broadcast_int(3)
    monkeypatch.setattr(tdist, "all_reduce", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError):   # not a peer's death: the memory message handles it
        d.all_reduce_scalars([1.0])


def _peer_gone_at_the_barrier(monkeypatch, rank: int, world: int = 2) -> list[bool]:
    """torch.distributed as a rank of `world` sees it when its peer is gone by the final barrier: the barrier raises
    gloo's error. Returns the list that destroy_process_group appends to."""
    import torch.distributed as tdist

    def closed(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer\n"
                           "[127.0.0.1]:31623")

    destroyed = []
    monkeypatch.setattr(tdist, "is_available", lambda: True)
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(tdist, "get_world_size", lambda *a, **k: world)
    monkeypatch.setattr(tdist, "barrier", closed)
    monkeypatch.setattr(tdist, "destroy_process_group", lambda *a, **k: destroyed.append(True))
    return destroyed


def test_a_peer_gone_at_the_final_barrier_is_one_line_and_the_group_is_torn_down(monkeypatch):
    """A rank that failed or died after the run's last collective (rank 0's final checkpoint on a full disk, a rank
    killed at the end): the barrier of `shutdown` raised gloo's RuntimeError, about 30 lines of traceback on each
    rank left (h99 F1, stop 49). Now PeerLost, one line naming the peer (of two ranks, the other), after the group
    is torn down. A failed run (ok=False) meets at no barrier, so it raises nothing."""
    from dpdm import distributed

    destroyed = _peer_gone_at_the_barrier(monkeypatch, rank=0)
    with pytest.raises(distributed.PeerLost, match=r"^rank 1 stopped after the run's last step, before the ranks met "
                                                   r"to finish \(its own output says why; here: RuntimeError: \[.*"
                                                   r"Connection closed by peer \[127.0.0.1\]:31623\)$"):
        distributed.shutdown(ok=True)
    assert destroyed == [True]
    _peer_gone_at_the_barrier(monkeypatch, rank=1)
    with pytest.raises(distributed.PeerLost, match=r"^rank 0 stopped after the run's last step"):
        distributed.shutdown(ok=True)
    _peer_gone_at_the_barrier(monkeypatch, rank=2, world=4)   # gloo names an address, not a rank
    with pytest.raises(distributed.PeerLost, match=r"^another rank stopped after the run's last step"):
        distributed.shutdown(ok=True)
    destroyed = _peer_gone_at_the_barrier(monkeypatch, rank=0)
    distributed.shutdown(ok=False)
    assert destroyed == [True]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_finished_run_whose_peer_is_gone_at_the_end_still_reports_on_rank_0(tiny, monkeypatch, capsys, rank):
    """Rank 0 whose train() returned has written the run's last checkpoint whole, so a peer gone at the final
    barrier no longer costs the run's summary: the --json document on stdout, one warning naming the peer, exit
    0 (it was a traceback and exit 4, and a scheduler took the finished run for a failed one: h99 F1, stop 49).
    Another rank says the same in one line, exit 4; rank 0's output says whether the last checkpoint was written
    (its disk may have been full). Training is stubbed: only what the command does after it is under test."""
    import json

    import dpdm.train
    from cli.main import main

    d, plan = tiny
    out = d / f"lost_peer_{rank}"
    summary = {"run": str(out), "steps_done": plan.steps, "plan_steps": plan.steps, "epsilon_spent": 1.25,
               "delta": plan.delta, "plan_digest": "abc", "private": True, "seed_given": True,
               "checkpoint": str(out / "checkpoint.pt"), "init": None, "grad_engine": "rules", "lr": 3e-4,
               "lr_segments": []}
    monkeypatch.setattr(dpdm.train, "train", lambda *args, **kwargs: summary)
    _peer_gone_at_the_barrier(monkeypatch, rank=rank)
    for name, value in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DPDM_DIST_TIMEOUT", raising=False)
    rc = main(["train", "--plan", str(d / "plan.json"), "--dataset", f"npz:{d / 'data.npz'}", "--out", str(out),
               "--device", "cpu", "--quiet", "--json"])
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if line.startswith("dpdm: ")]
    assert "Traceback" not in captured.err and "GLHF" not in captured.err
    if rank == 0:
        assert rc == 0 and json.loads(captured.out) == summary
        assert said == [f"dpdm: warning: rank 1 stopped after the run's last step, before the ranks met to finish "
                        f"(its own output says why; here: RuntimeError: [../third_party/gloo/gloo/transport/tcp/"
                        f"pair.cc:561] Connection closed by peer [127.0.0.1]:31623); this run is complete all the "
                        f"same: the checkpoint of its last step ({plan.steps}) is written whole"], captured.err
    else:
        assert rc == 4 and captured.out == ""
        assert said == ["dpdm: runtime failure: rank 0 stopped after the run's last step, before the ranks met to "
                        "finish (its own output says why; here: RuntimeError: [../third_party/gloo/gloo/transport/"
                        "tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:31623); this rank's part of the run "
                        "is done, and rank 0's output says whether the run's last checkpoint was written"], captured.err


@pytest.mark.parametrize("local_rank, device, said", [
    ("1", "cuda", "LOCAL_RANK=1 but this machine has 1 CUDA device: run torchrun with --nproc_per_node at most 1, or "
                  "train with --device cpu"),
    ("1", "auto", "LOCAL_RANK=1 but this machine has 1 CUDA device: run torchrun with --nproc_per_node at most 1, or "
                  "train with --device cpu"),
    ("0", "cuda:0", "--device='cuda:0': under torchrun each rank takes cuda:LOCAL_RANK; give --device cuda, and choose "
                    "the GPUs with CUDA_VISIBLE_DEVICES"),
])
def test_a_rank_without_a_gpu_of_its_own_is_one_line(tiny, monkeypatch, capsys, local_rank, device, said):
    """`torchrun --nproc_per_node=2 ... --device cuda` on a 1-GPU machine: rank 1's torch.cuda.set_device(1) was
    "invalid device ordinal", a traceback and exit 4 (h86, stop 46). An explicit cuda:N was replaced by
    cuda:LOCAL_RANK without a word. Both are now one line, exit 2, before any process group or file. No GPU here:
    torch.cuda reports one device, and set_device and the rendezvous fail the test if they are reached."""
    from cli.main import main

    d, _ = tiny

    def unreachable(*args, **kwargs):
        raise AssertionError("reached past the refusal")

    def set_device(index):
        if int(index) >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")   # what torch raises for a GPU it lacks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.distributed, "init_process_group", unreachable)
    env = {"WORLD_SIZE": "2", "RANK": local_rank, "LOCAL_RANK": local_rank, "MASTER_ADDR": "localhost",
           "MASTER_PORT": "29500"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DPDM_DIST_TIMEOUT", raising=False)
    out = d / f"no_gpu_{local_rank}_{device.replace(':', '')}"
    rc = main(["train", "--plan", str(d / "plan.json"), "--dataset", f"npz:{d / 'data.npz'}", "--out", str(out),
               "--device", device, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"dpdm: error: {said}\n", err
    assert not out.exists()
    # The rank that has its GPU is let through, on GPUs and on CPUs (gloo: LOCAL_RANK is no GPU's number there).
    from dpdm.distributed import launch_problem

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch_problem("cuda") is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_problem("cpu") is None and launch_problem() is None


@pytest.mark.parametrize("port", ["65536", "0"])
def test_a_master_port_that_is_no_port_is_one_line(tiny, monkeypatch, capsys, port):
    """MASTER_PORT=99999999 (digits, so it passed the check that it is a number) reached torch's rendezvous: "port
    must have value from 0 to 65535", a 43-line traceback and exit 4 (h97 F1, stop 48); port 0 has rank 0's
    store bind a free port of its own, which no other rank can know. Now one line, exit 2, before any process
    group or file."""
    from cli.main import main

    d, _ = tiny

    def unreachable(*args, **kwargs):
        raise AssertionError("reached past the refusal")

    monkeypatch.setattr(torch.distributed, "init_process_group", unreachable)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": port}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DPDM_DIST_TIMEOUT", raising=False)
    out = d / f"port_{port}"
    rc = main(["train", "--plan", str(d / "plan.json"), "--dataset", f"npz:{d / 'data.npz'}", "--out", str(out),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"dpdm: error: MASTER_PORT={port} is not a TCP port (1 to 65535)\n", err
    assert not out.exists()
    from dpdm.distributed import launch_problem

    monkeypatch.setenv("MASTER_PORT", "65535")   # the highest port is let through
    assert launch_problem("cpu") is None


@pytest.mark.parametrize("value, threads", [("1,1", 1), ("4,2", 4), (" 3 , 1", 3), ("abc", 1), ("0", 1), ("", 1),
                                            (None, 1)])
def test_a_gloo_rank_takes_the_first_of_an_omp_thread_list(monkeypatch, value, threads):
    """OpenMP's list form OMP_NUM_THREADS=4,2 (threads per nesting level), which torchrun passes on, was int()'s
    ValueError on every rank of a CPU launch, after the rendezvous (h97 F2, stop 48). A gloo rank takes the first
    element, the top level's; a value that is no positive integer gives 1, as before. The rendezvous is stubbed:
    only the thread count after it is under test."""
    import torch.distributed as tdist

    from dpdm.distributed import init_from_env

    set_to = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    for name, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": "29500", "OMP_NUM_THREADS": value}.items():
        if v is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, v)
    monkeypatch.delenv("DPDM_DIST_TIMEOUT", raising=False)
    assert init_from_env("cpu") == "cpu" and set_to == [threads]


# --- a rank of two in this one process: torch.distributed stubbed ---------------------------------

_CLOSED = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer\n[127.0.0.1]:31623")


def _one_rank_of_two(monkeypatch, rank: int, peer: list[torch.Tensor] = (), lost=lambda: False) -> list[torch.Tensor]:
    """torch.distributed as rank `rank` of two sees it: the peer's value at the i-th all_gather is `peer[i]` (what
    the peer passed at its own i-th; past the list, this rank's own), all_reduce and broadcast leave the tensor as
    it is, and every collective raises gloo's "Connection closed by peer" once `lost()`. Returns the list of this
    rank's all_gather inputs, to be another run's `peer`."""
    import torch.distributed as tdist

    sent = []

    def collective(fn):
        def call(*args, **kwargs):
            if lost():
                raise RuntimeError(_CLOSED)
            return fn(*args, **kwargs)
        return call

    def all_gather(out, t):
        sent.append(t.clone())
        for o in out:
            o.copy_(t)
        if len(sent) <= len(peer):
            out[1 - rank].copy_(peer[len(sent) - 1])

    monkeypatch.setattr(tdist, "is_available", lambda: True)
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(tdist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(tdist, "all_gather", collective(all_gather))
    monkeypatch.setattr(tdist, "all_reduce", collective(lambda t, *a, **k: None))
    monkeypatch.setattr(tdist, "broadcast", collective(lambda t, *a, **k: None))
    return sent


def _stop_at_the_folders_verdict(monkeypatch, stop):
    """torch.distributed.broadcast raises `stop` at rank 0's verdict on the run folder, past every check of the
    ranks' inputs and weights; the broadcast before it, of rank 0's verdict on the record of the steps run
    (`_unsaved_steps`: nothing), goes through."""
    import torch.distributed as tdist

    broadcasts = []

    def broadcast(*a, **k):
        broadcasts.append(1)
        if len(broadcasts) > 1:
            raise stop
    monkeypatch.setattr(tdist, "broadcast", broadcast)


def _private_images(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 3


@pytest.fixture(scope="module")
def small_plan():
    """A plan for `_private_images`, 4 steps. Each start verifies the plan document (the PRV accountant, a second
    on 2 busy cores): the tests below that start several runs check it once here, and stub the check."""
    doc = accounting.make_plan_document(accounting.PrivacyPlan(
        dataset_size=24, batch_size=6, steps=4, noise_multiplier=1.0, clip_norm=1.0, noise_multiplicity=1,
        delta=1e-5, dataset_name="tiny"))
    accounting.verify_document(doc)
    return doc


def test_ranks_whose_warm_start_holds_other_weights_are_refused_before_training(tmp_path, monkeypatch, small_plan):
    """The ranks compared their options, so the name given to --init-from, not the weights it holds on each rank
    (each node's own copy, one stale; a relative name read from other folders): both trained on the private data
    to the first checkpoint, whose check then failed in a 34-line traceback, exit 4, after config.json and
    metrics.csv were written (h114 F1, stop 51). Now every rank refuses in one line before any file is written.
    Rank 1 runs first (in this process) and stops at the verdict on the folder; rank 0 then sees what it gathered."""
    from dpdm.train import TrainConfig, TrainError, train

    class Stop(Exception):
        pass

    monkeypatch.setattr(accounting, "verify_document", lambda d: None)   # checked by `small_plan`
    x, y = _private_images()
    doc = small_plan
    g = torch.Generator().manual_seed(1)   # the warm start: --no-dp on other (public) images
    public = (torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, torch.arange(16) % 3)
    train(doc, *public, 3, tmp_path / "pub", TrainConfig(model="small", seed=1, private=False), progress=False)
    state = ckpt.load_checkpoint(tmp_path / "pub" / "checkpoint.pt")
    for name, shift in (("a", 0.0), ("b", 0.01)):   # b: the same run's weights, a little off (a stale copy)
        (tmp_path / name).mkdir()
        first = next(iter(state["ema"]))
        ckpt.save_checkpoint({**state, "ema": {**state["ema"], first: state["ema"][first] + shift}},
                             tmp_path / name / "warm.pt")
    cfg = TrainConfig(model="small", seed=3, checkpoint_every=2, init_from="warm.pt")

    def run(rank, folder, out, peer=()):   # this rank's all_gather inputs, up to rank 0's verdict on the folder
        monkeypatch.chdir(tmp_path / folder)
        sent = _one_rank_of_two(monkeypatch, rank=rank, peer=peer)
        _stop_at_the_folders_verdict(monkeypatch, Stop())
        with pytest.raises(Stop):   # every check before the verdict passed
            train(doc, x, y, 3, tmp_path / out, cfg, progress=False)
        return sent

    with pytest.raises(TrainError, match=r"^the ranks differ in the weights they start from: --init-from 'warm.pt' "
                                         r"holds other weights on some rank .*; give every rank the same file "
                                         r"\(nothing was written\)$"):
        run(0, "a", "run", peer=run(1, "b", "run"))
    assert not (tmp_path / "run").exists()   # the same weights are let through: the two-rank runs above


@pytest.mark.parametrize("every, lost_after, said", [
    (4, 1, "no checkpoint was saved: run the same command again, adding --spend-unsaved-steps if it says steps ran "
           "(`--resume` has nothing to resume)"),
    (2, 3, "the run's checkpoint of step 2 is whole, and `dpdm train --resume` continues from it"),
])
def test_a_rank_lost_during_training_names_what_there_is_to_resume(tmp_path, monkeypatch, small_plan, every,
                                                                   lost_after, said):
    """A peer lost before the first checkpoint: rank 0 said "the run's last checkpoint is whole, and `dpdm train
    --resume` continues from it", and --resume then refused, there being none (h114 F3, stop 51). Rank 0's line
    now says what the run folder holds, as a full disk's and a diverged run's do."""
    from dpdm.train import RankLost, TrainConfig, train

    monkeypatch.setattr(accounting, "verify_document", lambda d: None)   # checked by `small_plan`
    done = []
    _one_rank_of_two(monkeypatch, rank=0, lost=lambda: len(done) >= lost_after)
    out = tmp_path / "run"
    with pytest.raises(RankLost) as e:
        train(small_plan, *_private_images(), 3, out, TrainConfig(model="small", seed=3, checkpoint_every=every),
              progress=False, on_step=done.append)
    assert str(e.value) == ("another rank stopped during training (its own output says why; here: RuntimeError: "
                            f"{' '.join(_CLOSED.split())}); {said}")
    assert (out / "checkpoint.pt").exists() == (every < lost_after)


@pytest.mark.parametrize("rank, said", [
    ("0", "rank 1 did not join rank 0 at MASTER_ADDR=127.0.0.1 MASTER_PORT={port} within 1 s (DPDM_DIST_TIMEOUT): "
          "it probably refused its own input first (its own output says why), or was not started; nothing was "
          "written (here: DistStoreError: "),
    ("1", "rank 1 could not reach rank 0 at MASTER_ADDR=127.0.0.1 MASTER_PORT={port} within 1 s (DPDM_DIST_TIMEOUT): "
          "rank 0 probably refused its own input first (its own output says why), or was not started, or is not "
          "at that address; nothing was written (here: DistNetworkError: "),
])
def test_a_peer_that_never_joins_is_one_line(monkeypatch, rank, said):
    """Ranks started by a scheduler (no torchrun agent to stop the others), one of which refused its own input
    before the rendezvous (a plan missing on its node): the other waited DPDM_DIST_TIMEOUT, then printed torch's
    traceback, 44 lines on rank 0 and 84 on rank 1, exit 4 (h114 F2, stop 51). Now RendezvousError, one line
    naming who did not come, where and for how long, which `dpdm train` prints with exit 4. Here each rank is
    started alone, with nobody at the port."""
    import socket

    from dpdm import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "DPDM_DIST_TIMEOUT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.RendezvousError) as e:
        distributed.init_from_env("cpu")
    assert str(e.value).startswith(said.format(port=port)) and str(e.value).endswith(")"), str(e.value)
    assert "\n" not in str(e.value) and "frame #" not in str(e.value) and not torch.distributed.is_initialized()


def test_a_rank_whose_peer_never_joins_says_so_in_one_line(tiny, monkeypatch, capsys):
    """`dpdm train` prints RendezvousError (test_a_peer_that_never_joins_is_one_line) as one line, exit 4, as it
    prints a peer lost later; it was torch's 44-line traceback (h114 F2, stop 51)."""
    import socket

    from cli.main import main

    d, _ = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "DPDM_DIST_TIMEOUT": "1"}.items():
        monkeypatch.setenv(name, value)
    rc = main(["train", "--plan", str(d / "plan.json"), "--dataset", f"npz:{d / 'data.npz'}", "--out",
               str(d / "alone"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 4 and err.count("\n") == 1, err
    assert err.startswith(f"dpdm: runtime failure: rank 1 did not join rank 0 at MASTER_ADDR=127.0.0.1 MASTER_PORT="
                          f"{port} within 1 s (DPDM_DIST_TIMEOUT)"), err
    assert not (d / "alone").exists()


@pytest.mark.parametrize("rank, training, saved, said", [
    (1, True, 4, "stopped during training (its own output says why; here: RuntimeError: closed); `dpdm train --resume` "
                 "continues from the run's last checkpoint, that of step 4 unless rank 0 stopped while writing it "
                 "(rank 0's output says)"),
    (1, False, 4, "stopped before the first step (its own output says why; here: RuntimeError: closed); the run's "
                  "checkpoint of step 4 is whole, and `dpdm train --resume` continues from it"),
    (0, False, 0, "stopped before the first step (its own output says why; here: RuntimeError: closed); no checkpoint "
                  "was saved: run the same command again (`--resume` has nothing to resume)"),
])
def test_rank_lost_says_when_the_peer_stopped_and_what_a_rank_other_than_0_knows_of_the_checkpoint(rank, training,
                                                                                                   saved, said):
    """mut54 (stop 52): RankLost's line on every rank. Rank 1 during training may know of a checkpoint rank 0 did
    not finish writing, so it says so; before the first step (a resumed run's checkpoint, which no rank writes) it
    is whole; and a peer lost before training began is not said to have stopped "during training"."""
    from dpdm.train import _Dist, _rank_lost_message

    dist = _Dist(rank=rank, world_size=2, training=training, last_saved=saved)
    assert _rank_lost_message(RuntimeError("closed"), dist) == f"another rank {said}"


def test_ranks_that_resume_other_emas_of_the_run_are_refused_before_training(tmp_path, monkeypatch, small_plan):
    """mut54 (stop 52): a resume compares the digest of the model AND its EMAs across ranks (a stale copy of the run
    folder on one node whose checkpoint differs in its EMA only would release another average than rank 0's).
    Rank 1 runs first (in this process) on one checkpoint and stops at the first broadcast; rank 0 then resumes
    another, whose EMA alone differs, and refuses in one line before anything is written."""
    from dpdm.train import TrainConfig, TrainError, train

    class Stop(Exception):
        pass

    monkeypatch.setattr(accounting, "verify_document", lambda d: None)   # checked by `small_plan`
    x, y = _private_images()
    cfg = TrainConfig(model="small", seed=3, checkpoint_every=2)
    out = tmp_path / "run"

    def stop_at_3(n):
        if n == 3:
            raise Stop

    with pytest.raises(Stop):
        train(small_plan, x, y, 3, out, cfg, progress=False, on_step=stop_at_3)
    path = out / "checkpoint.pt"
    state = ckpt.load_checkpoint(path)
    assert state["ledger"]["steps_done"] == 2
    first = next(iter(state["ema"]))
    other = {**state, "ema": {**state["ema"], first: state["ema"][first] + 0.01}}

    def run(rank, peer=()):
        sent = _one_rank_of_two(monkeypatch, rank=rank, peer=peer)
        _stop_at_the_folders_verdict(monkeypatch, Stop())
        with pytest.raises(Stop):
            train(small_plan, x, y, 3, out, cfg, resume=True, progress=False)
        return sent

    sent = run(1)
    ckpt.save_checkpoint(other, path)
    before = sorted(p.name for p in out.iterdir())
    _one_rank_of_two(monkeypatch, rank=0, peer=sent)
    _stop_at_the_folders_verdict(monkeypatch, Stop())
    with pytest.raises(TrainError, match=r"^the ranks differ in the weights they resume: .*checkpoint\.pt' holds "
                                         r"another checkpoint of the run on some rank .*\(nothing was written\)$"):
        train(small_plan, x, y, 3, out, cfg, resume=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_peer_lost_before_a_resumes_first_step_names_the_checkpoint_it_resumes(tmp_path, monkeypatch, small_plan):
    """mut54 (stop 52): RankLost's line knows the checkpoint a resume starts from before its first step: a peer lost
    after the ranks compared their inputs (at the broadcast of their verdict) is not "no checkpoint was saved: run
    the same command again (`--resume` has nothing to resume)"."""
    from dpdm.train import RankLost, TrainConfig, train

    class Stop(Exception):
        pass

    def stop_at_3(n):
        if n == 3:
            raise Stop

    monkeypatch.setattr(accounting, "verify_document", lambda d: None)   # checked by `small_plan`
    x, y = _private_images()
    cfg = TrainConfig(model="small", seed=3, checkpoint_every=2)
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(small_plan, x, y, 3, out, cfg, progress=False, on_step=stop_at_3)
    box = {}
    box["sent"] = _one_rank_of_two(monkeypatch, rank=0, lost=lambda: len(box["sent"]) >= 2)   # after 2 all_gathers
    with pytest.raises(RankLost) as e:
        train(small_plan, x, y, 3, out, cfg, resume=True, progress=False)
    assert len(box["sent"]) == 2   # the inputs' and the starting weights' digests
    assert str(e.value) == ("another rank stopped before the first step (its own output says why; here: RuntimeError: "
                            f"{' '.join(_CLOSED.split())}); the run's checkpoint of step 2 is whole, and `dpdm train "
                            "--resume` continues from it")


@pytest.mark.parametrize("verdict", [-1, 2])
def test_rank_0s_verdict_on_the_steps_a_killed_new_run_ran_binds_every_rank(tmp_path, monkeypatch, small_plan,
                                                                              verdict):
    """Stop 52: a new run in the folder of one killed before its first checkpoint, whose record (`.steps_done`,
    rank 0's) says it ran steps, is refused, or with --spend-unsaved-steps goes on after them: rank 0 reads the
    record, and another rank takes its verdict (here rank 1, whose own folder holds nothing), refusing with it, or
    starting at the spent steps (2 of 4: its steps 3 and 4), writing nothing."""
    import torch.distributed as tdist

    from dpdm.train import TrainConfig, TrainError, train

    monkeypatch.setattr(accounting, "verify_document", lambda d: None)   # checked by `small_plan`
    _one_rank_of_two(monkeypatch, rank=1)
    broadcasts = []

    def broadcast(t, *a, **k):   # rank 0's verdict on the record, its first broadcast
        broadcasts.append(int(t.item()))
        if len(broadcasts) == 1:
            t.fill_(verdict)

    monkeypatch.setattr(tdist, "broadcast", broadcast)
    out, done = tmp_path / "run", []
    cfg = TrainConfig(model="small", seed=3, checkpoint_every=2)
    if verdict < 0:
        with pytest.raises(TrainError, match=r"^rank 0 refused to start the run \(its line says why\); nothing was "
                                             r"written$"):
            train(small_plan, *_private_images(), 3, out, cfg, progress=False, spend_unsaved_steps=True)
    else:
        summary = train(small_plan, *_private_images(), 3, out, cfg, progress=False, spend_unsaved_steps=True,
                        on_step=done.append)
        assert done == [3, 4] and summary["steps_done"] == 4 and summary[ckpt.DISCARDED_STEPS_KEY] == 2
    assert broadcasts[0] == 0 and not out.exists()   # rank 1 read no record, and wrote nothing
