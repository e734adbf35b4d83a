"""Signal against DP noise in one private step, measured at a checkpoint (issue 4: choosing K).

A DP-SGD step adds noise of norm about sigma * C * sqrt(d) / B to the mean of B clipped
per-example gradients. What that mean carries is its expectation, the *signal*
s = ||E[clip(g_i)]||, which the noise multiplicity K raises by averaging the diffusion draws inside
each example's loss. This script estimates s at a trained checkpoint for several K, with the
unbiased estimator (||sum_i u_i||^2 - sum_i ||u_i||^2) / (B (B - 1)) over B clipped gradients u_i,
and prints the noise norm of the run's plan beside it, and the seconds each K costs. With
`--by-sigma` it also draws every example at one noise level per bucket (K = 1) and reports the
per-example gradient norm and the signal of the unit directions there: which noise levels
dominate the clipped gradient.

    .venv/bin/python benchmarks/grad_signal.py --checkpoint RUN/checkpoint.pt [--K 1,2,4,8]
                                               [--batch 256] [--reps 6] [--by-sigma] [--threads 2]
                                               [--json OUT.json]

d counts the parameters the run trained: a `--trainable` run's clipped gradients and noise are over its
trainable parameters only, and so are the figures here. A `--public-subspace` run (noise in a subspace of
public gradients) is refused, and so is a checkpoint without its run's plan.json beside it (the locked plan it was
trained under, checked against its ledger): the clip norm and the noise are the plan's. A `--no-dp` run (nothing
clipped or noised) is measured against its plan and marked NON-PRIVATE (the JSON's "run_private": false): its
noise norm is what a private run of that plan would add.

The figures are NON-PRIVATE statistics of the private data (computed from the private training images
without noise; the JSON says "non_private_statistics_of_the_private_data": true): treat the output like the
run folder (keep it private).

Measured on issue 4's benchmark checkpoint (1407 steps, small U-Net, v-prediction, K 2; sharing
the machine with one other process): `OMP_WAIT_POLICY=PASSIVE .venv/bin/python
benchmarks/grad_signal.py --checkpoint RUN/checkpoint.pt --K 1,2,4,8 --by-sigma --threads 1`:

    noise norm per step 2.588 (sigma 1.4003, expected batch 256)
       K | signal | s/batch          sigma bucket | share of draws | median |g| | unit signal
       1 | 0.070  |  1.68            [0.002, 0.05) |  3.2%  | 6.18 | 0.54
       2 | 0.088  |  2.99            [0.05, 0.2)   |  9.3%  | 3.60 | 0.23
       4 | 0.103  |  7.03            [0.2, 2)      | 58.1%  | 1.5-2.4 | 0.13-0.16
       8 | 0.117  | 21.19            [2, 80)       | 29.1%  | 4.2-4.7 | 0.06-0.15

The signal grows about as K^0.25 while the cost grows linearly or worse, so at a fixed CPU budget
more K does not pay there. The few draws below sigma 0.2 carry large, coherent gradients that
dominate the clipped direction of the examples holding them.

`--clip-norms C1,C2,...` clips the same per-example gradients at other norms too and prints each one's
signal over the noise that a plan with that clip norm (same epsilon) would add: choosing C without
training once per value. Measured at the end of issue 4's warm-started run (digits28-aug start, B1024,
235 steps, sigma 2.116, C 1, K 2): `benchmarks/grad_signal.py --checkpoint RUN/checkpoint.pt --K 2
--clip-norms 0.03,0.1,0.3,1,3 --reps 4 --threads 1`:

    median |g| 1.00;  C 0.03, 0.1, 0.3: all clipped, signal/noise 0.0438
                      C 1 (the plan's): 48.7% clipped, 0.0380;  C 3: 3.1% clipped, 0.0218

A clip norm that clips every example carries 15% more signal per step than C 1 here (with Adam the
step's scale does not depend on C). Below the smallest per-example norm all C are alike.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _argtypes import int_at_least  # noqa: E402

# Noise-level buckets of `--by-sigma` (edges of sigma).
SIGMA_EDGES = (0.002, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)


class RunRefused(ValueError):
    """A checkpoint whose private step this script cannot reproduce (main() prints it in one line, exit 2)."""


def unit_signal(flat: torch.Tensor, clip_norm: float | None) -> tuple[float, float]:
    """(unbiased estimate of ||E clip(g)||^2 from the rows g of `flat` [B, d], median ||g||).

    clip_norm=None takes the unit directions g / ||g|| instead of clip(g).
    """
    B = flat.shape[0]
    if B < 2:
        raise ValueError(f"need at least 2 examples, got {B}")
    flat = flat.double()
    norms = flat.norm(dim=1)
    if clip_norm is None:
        u = flat / norms.clamp(min=1e-300)[:, None]
    else:
        u = flat * (clip_norm / norms.clamp(min=clip_norm))[:, None]   # clip(g)
    total = u.sum(0)
    sq = (total @ total - (u * u).sum()) / (B * (B - 1))
    return float(sq), float(norms.median())


def _noise_norm(plan, clip_norm: float, d: int) -> float:
    """Norm of one step's noise on the mean gradient: sigma * C * sqrt(d) / B."""
    return plan.noise_multiplier * clip_norm * math.sqrt(d) / plan.batch_size


def _signed_sqrt(v: float) -> float:
    return math.copysign(math.sqrt(abs(v)), v)


def _loss_for(config: dict):
    from dpdm.loss import EDMLoss, VLoss

    if config["precond"] != "v":
        return EDMLoss(sigma_data=config["sigma_data"])
    trained = config.get("train", {}).get("train_sigma")
    return VLoss() if trained is None else VLoss.from_sigma_range(*trained)


def measure(checkpoint: str | Path, *, Ks=(1, 2, 4, 8), batch: int = 256, reps: int = 6, by_sigma: bool = False,
            seed: int = 0, data=None, clip_norms=()) -> dict:
    """The figures described in the module docstring, as a dict.

    `clip_norms`: for each K, also the signal of the same per-example gradients clipped at each of these
    norms, the fraction clipped, and (with a plan) the signal over that clip norm's noise norm
    (`by_K[K]["by_clip"]`): how a plan with another clip norm (same epsilon) would fare.
    """
    clip_norms = tuple(float(c) for c in clip_norms)
    if not all(math.isfinite(c) and c > 0 for c in clip_norms):
        raise ValueError(f"clip_norms={clip_norms!r} must be positive")
    from dpdm.checkpoint import CheckpointError, load_checkpoint, verify_run_ledger
    from dpdm.datasets import load_dataset
    from dpdm.engine import per_sample_grads
    from dpdm.loss import drop_labels, engine_loss_fn
    from dpdm.train import build_denoiser, select_trainable

    state = load_checkpoint(checkpoint)
    config = state["config"]
    subspace = config.get("train", {}).get("subspace_dim")
    if subspace is not None:
        # Its noise lies in a k-dimensional subspace of public gradients (norm ~ sqrt(k), not sqrt(d)) and its
        # signal is the projected one: neither is what this script measures.
        raise RunRefused(f"{checkpoint}: a --public-subspace run (subspace_dim {subspace}) adds its noise in a "
                         "subspace; grad_signal.py measures full-space noise only")
    # The run's own plan, verified against the checkpoint's ledger (its digest, steps and epsilon): without it the
    # clip norm fell back to 1.0 whatever the run used, and a plan.json of another run was read unchecked.
    try:
        plan = verify_run_ledger(checkpoint, state, missing=(
            f"no plan.json beside {str(checkpoint)!r}: put the run's plan.json (the locked plan it was trained "
            "under) beside it; its clip norm and noise are what this script measures against")).plan
    except CheckpointError as e:
        raise RunRefused(str(e)) from None
    private = bool(state["ledger"]["private"])
    D = build_denoiser(config)
    D.load_state_dict(state["model"])          # the raw weights the optimizer was stepping
    # The run clipped and noised only its --trainable parameters: d and the clipped gradients are theirs.
    trainable = config.get("train", {}).get("trainable")
    select_trainable(D, None if trainable is None else tuple(trainable))
    D.train()
    clip_norm = plan.clip_norm
    data = load_dataset(config["dataset"], "train") if data is None else data
    conditional = int(config["num_classes"]) > 0 and data.y is not None
    loss_obj = _loss_for(config)
    loss_fn = engine_loss_fn(loss_obj, conditional=conditional)
    d = sum(p.numel() for p in D.parameters() if p.requires_grad)
    batch = min(batch, len(data))
    g = torch.Generator().manual_seed(seed)

    def grads(idx, sigma, noise):
        example = [data.x[idx]]
        if conditional:
            example.append(drop_labels(data.y[idx], float(config["train"]["label_dropout"]), int(config["num_classes"]),
                                       generator=g))
        per = per_sample_grads(D, loss_fn, *example, sigma, noise)
        return torch.cat([v.reshape(len(idx), -1) for v in per.values()], 1)

    # run_private False: a --no-dp run clipped and noised nothing; its noise norm is what a private run of its plan
    # would add, not what it added (0).
    out: dict = {"checkpoint": str(checkpoint), "params": d, "batch": batch, "reps": reps, "clip_norm": clip_norm,
                 "non_private_statistics_of_the_private_data": True, "run_private": private, "by_K": {}}
    out["plan"] = {"noise_multiplier": plan.noise_multiplier, "batch_size": plan.batch_size,
                   "noise_multiplicity": plan.noise_multiplicity, "steps": plan.steps}
    out["noise_norm"] = _noise_norm(plan, clip_norm, d)
    shape = tuple(data.x.shape[1:])
    for K in Ks:
        sq, med, secs = [], [], 0.0
        by_clip = {c: ([], []) for c in clip_norms}     # C -> (signal^2 per rep, clipped fraction per rep)
        for _ in range(reps):
            idx = torch.randperm(len(data), generator=g)[:batch]
            sigma, noise = loss_obj.draw(batch, K, shape, generator=g)
            t0 = time.perf_counter()
            flat = grads(idx, sigma, noise)
            secs += time.perf_counter() - t0
            flat = flat.double()          # once: unit_signal works in float64 and then skips the copy
            s, m = unit_signal(flat, clip_norm)
            sq.append(s)
            med.append(m)
            if clip_norms:
                norms = flat.norm(dim=1)
                for c, (csq, frac) in by_clip.items():
                    csq.append(unit_signal(flat, c)[0])
                    frac.append(float((norms > c).double().mean()))
        mean_sq = sum(sq) / reps
        row = {"signal": _signed_sqrt(mean_sq), "signal_reps": [_signed_sqrt(v) for v in sq],
               "median_grad_norm": sorted(med)[reps // 2], "seconds_per_batch": secs / reps}
        row["snr_per_step"] = row["signal"] / out["noise_norm"]
        if clip_norms:
            row["by_clip"] = {}
            for c, (csq, frac) in by_clip.items():
                entry = {"signal": _signed_sqrt(sum(csq) / reps), "clipped_fraction": sum(frac) / reps}
                entry["snr_per_step"] = entry["signal"] / _noise_norm(plan, c, d)   # that plan with clip norm c
                row["by_clip"][f"{c:g}"] = entry
        out["by_K"][str(K)] = row
    if by_sigma:
        out["by_sigma"] = []
        train_draws = loss_obj.draw_sigma((100_000,), generator=g, device="cpu", dtype=torch.float64)
        for lo, hi in zip(SIGMA_EDGES[:-1], SIGMA_EDGES[1:]):
            sq, med = [], []
            for _ in range(reps):
                idx = torch.randperm(len(data), generator=g)[:batch]
                u = torch.rand(batch, 1, generator=g, dtype=torch.float64)
                sigma = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u).to(data.x.dtype)
                noise = torch.randn((batch, 1, *shape), generator=g)
                s, m = unit_signal(grads(idx, sigma, noise), clip_norm=None)
                sq.append(s)
                med.append(m)
            share = float(((train_draws >= lo) & (train_draws < hi)).double().mean())
            out["by_sigma"].append({"sigma": [lo, hi], "training_share": share,
                                    "median_grad_norm": sorted(med)[reps // 2],
                                    "unit_signal": _signed_sqrt(sum(sq) / reps)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--K", default="1,2,4,8", help="comma-separated noise multiplicities")
    # the estimator needs 2 examples (unit_signal), and the averages 1 rep: a traceback before, after loading
    ap.add_argument("--batch", type=int_at_least(2), default=256)
    ap.add_argument("--reps", type=int_at_least(1), default=6)
    ap.add_argument("--by-sigma", action="store_true")
    ap.add_argument("--threads", type=int_at_least(1), default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip-norms", default="", metavar="C1,C2,...",
                    help="also the signal and signal/noise of the same gradients clipped at these norms")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from dpdm.checkpoint import CheckpointError

    torch.set_num_threads(a.threads)
    try:
        res = measure(a.checkpoint, Ks=[int(k) for k in a.K.split(",")], batch=a.batch, reps=a.reps,
                      by_sigma=a.by_sigma, seed=a.seed, clip_norms=[float(c) for c in a.clip_norms.split(",") if c])
    except (RunRefused, CheckpointError) as e:   # CheckpointError: a missing or corrupt checkpoint
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(f"grad signal at {a.checkpoint} ({res['params']:,} trained params, B={res['batch']}, {res['reps']} reps; "
          "NON-PRIVATE statistics of the private data)")
    if not res["run_private"]:
        print("NON-PRIVATE run (--no-dp): it clipped and noised nothing; the noise norm and signal/noise below are "
              "what a private run of its plan would add")
    p = res["plan"]
    print(f"noise norm per step: {res['noise_norm']:.3f} (sigma {p['noise_multiplier']:.4f}, "
          f"expected batch {p['batch_size']}, plan K {p['noise_multiplicity']})")
    print("   K |  signal | median |g| | s/batch | signal/noise")
    for K, row in res["by_K"].items():
        print(f"{K:>4} | {row['signal']:7.4f} | {row['median_grad_norm']:10.3f} | "
              f"{row['seconds_per_batch']:7.2f} | {row['snr_per_step']:.4f}")
        for c, entry in row.get("by_clip", {}).items():
            print(f"       clip {c:>6}: signal {entry['signal']:.4f}, "
                  f"clipped {100 * entry['clipped_fraction']:5.1f}%, signal/noise {entry['snr_per_step']:.4f}")
    for row in res.get("by_sigma", []):
        lo, hi = row["sigma"]
        print(f"sigma [{lo:g}, {hi:g}): {100 * row['training_share']:4.1f}% of training draws, "
              f"median |g| {row['median_grad_norm']:.3f}, unit signal {row['unit_signal']:.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
