"""`dpdm sample`: synthetic images from a trained run."""
from __future__ import annotations

import os

import click

from cli._common import (FiniteFloatRange, PathOption, checkpoint_of, discarded_note, emit_json, info,
                         resolve_device, warn, warn_if_slow_bf16, warn_non_private, warn_steps_past_checkpoint)
from cli.errors import BadInput, runtime_failure

_MAX_SEED = 2**63 - 1   # dpdm.sampling.MAX_SEED (not imported here: torch loads only when needed)
_MAX_SAMPLER_STEPS = 10_000   # dpdm.sampling.MAX_SAMPLER_STEPS (10x DPDM's 1,000; 1e13 exhausted memory)


@click.command()
@click.option("--run", "run_dir", type=PathOption(file_okay=False), default=None, help="A run folder from `dpdm train`.")
@click.option("--checkpoint", "checkpoint_path", type=PathOption(dir_okay=False), default=None, help="A checkpoint file instead of --run.")
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of images.")
@click.option("--sampler", type=click.Choice(["euler", "heun", "churn"]), default="euler", show_default=True,
              help="euler: the paper's 'DDIM' (PF-ODE); heun: EDM; churn: stochastic Heun.")
@click.option("--sampler-steps", type=click.IntRange(min=2, max=_MAX_SAMPLER_STEPS), default=50,
              show_default=True)
@click.option("--s-churn", type=FiniteFloatRange(min=0), default=None,
              help="churn only: total churn, spread over the steps: each step in [--s-min, --s-max] raises the "
                   "noise from sigma to sigma * (1 + min(S_churn / steps, 1)). DPDM's best MNIST FID used 100 with "
                   "--sampler-steps 1000, 0.1 per step; at the default 50 steps 100 is the cap, 1 per step "
                   "(sigma doubled), and --s-churn 5 is DPDM's 0.1.  [default: 100]")
@click.option("--s-min", type=FiniteFloatRange(min=0), default=None, help="churn only  [default: 0.05]")
@click.option("--s-max", type=FiniteFloatRange(min=0), default=None, help="churn only  [default: 50]")
@click.option("--s-noise", type=FiniteFloatRange(min=0), default=None,
              help="churn only: scale of the fresh noise, at most 10  [default: 1]")
@click.option("--guidance", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="Classifier-free guidance weight w (0: none).")
@click.option("--guidance-interval", type=FiniteFloatRange(min=0), nargs=2, default=None, metavar="LO HI",
              help="Guide only the steps with LO < sigma <= HI (Kynkaanniemi et al. 2024), both finite; the others "
                   "are unguided and call the network once.  [default: every step]")
@click.option("--sigma-min", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Lowest noise level of the Karras schedule, at least 1e-10; the last step returns "
                   "D(x; sigma_min), or, where --sampler churn churns at sigma_min (--s-min at or below it), D at the "
                   "level the churn raised it to.  [default: 0.002, or the lowest level the run trained on if higher]")
@click.option("--sigma-max", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Highest noise level, at most 1e10.  "
                   "[default: 80, or the highest level the run trained on if lower]")
@click.option("--rho", type=FiniteFloatRange(min=0, min_open=True), default=7.0, show_default=True,
              help="Karras schedule exponent (higher: more steps at low noise).")
@click.option("--weights", default=None,
              help="ema (the run's EMA), raw (the last iterate), or power:GAMMA (kept by `dpdm train --ema-power`).  "
                   "[default: ema; a release file's own weights]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: the network under bfloat16 autocast, 1.3-1.9x faster on a CPU with AMX (small to mnist "
                   "U-Net; benchmarks/precision.py), slower on one without; the images differ from fp32's by "
                   "a fraction of a grey level on average.")
@click.option("--seed", type=click.IntRange(min=0, max=_MAX_SEED), default=0, show_default=True,
              help="Image i uses seed + i; 0 <= seed <= 2**63 - n (n: --n), so that every image's seed is below 2**63. "
                   "On the CPU, torch's generator keeps the low 32 bits of each: seeds 2**32 apart draw the same images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per network call; a batch of fewer than 16 (a trailing one too) is padded with copies of "
                   "its images, so that the images do not depend on the batch size (measured with MKL's AVX512 "
                   "kernels; with its AVX2 ones, as on AMD CPUs, a pixel may still differ by a grey level).")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "out_path", required=True, type=PathOption(dir_okay=False), help="samples.npz (x uint8 NCHW, y int).")
@click.option("--grid", "grid_path", type=PathOption(dir_okay=False), default=None,
              help="Also write a grid of samples, a row per class (.png, .pdf, .svg, .jpg or .jpeg). It names the "
                   "model's plan and kind (private, or --no-dp), and replaces a grid of `dpdm sample` of the same "
                   "plan and kind (others: see --force), never another file.")
@click.option("--force", is_flag=True,
              help="Replace an --out samples file or a --grid of a model of another plan, or of this plan from a run "
                   "of the other kind (private, or --no-dp), or a grid naming neither (from a dpdm before grids named "
                   "them); never the run's own data, nor a file `dpdm sample` did not write.")
@click.option("--json", "as_json", is_flag=True)
def sample(run_dir, checkpoint_path, n, sampler, sampler_steps, s_churn, s_min, s_max, s_noise, guidance, guidance_interval, sigma_min, sigma_max, rho, weights, precision,
           seed, batch_size, device, out_path, grid_path, force, as_json):
    """Draw synthetic images from a trained (EMA) model."""
    path = checkpoint_of(run_dir, checkpoint_path)
    # '~' as the check below reads it (`output_parent_problem`): the check probed the home folder and the file
    # went to ./~/ (h111 N5).
    out_path = os.path.expanduser(out_path)
    grid_path = None if grid_path is None else os.path.expanduser(grid_path)
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise BadInput(f"--sigma-min={sigma_min:g} must be below --sigma-max={sigma_max:g}")
    if guidance_interval is not None and not 0 <= guidance_interval[0] < guidance_interval[1]:
        raise BadInput(f"--guidance-interval {guidance_interval[0]:g} {guidance_interval[1]:g} must satisfy 0 <= LO < HI")
    if guidance_interval is not None and guidance == 0:   # as the churn options need --sampler churn
        raise BadInput(f"--guidance-interval {guidance_interval[0]:g} {guidance_interval[1]:g} applies only with "
                       "--guidance > 0: without it no step is guided, and the interval would be recorded all the same")
    churn = {k: v for k, v in (("S_churn", s_churn), ("S_min", s_min), ("S_max", s_max), ("S_noise", s_noise))
             if v is not None}
    if churn and sampler != "churn":
        raise BadInput(f"--s-churn/--s-min/--s-max/--s-noise apply to --sampler churn only (got --sampler {sampler})")
    if churn and not _churn_value(s_min, "S_min") < _churn_value(s_max, "S_max"):
        # against the default where one is left out: a lone --s-min 60 (above the default --s-max 50) would
        # otherwise turn the churn off without a word, and the samples would be Heun's, recorded as churn
        given = " ".join(f"--{k} {v:g}" for k, v in (("s-min", s_min), ("s-max", s_max)) if v is not None)
        raise BadInput(f"--s-min must be below --s-max (got {given}; defaults --s-min "
                       f"{_churn_value(None, 'S_min'):g}, --s-max {_churn_value(None, 'S_max'):g}): with S_min >= "
                       "S_max no step would churn")
    if not str(out_path).lower().endswith(".npz"):   # np.savez writes the name as given (h131 N4)
        raise BadInput(f"--out={out_path!r} must end in .npz")
    if n - 1 > _MAX_SEED:   # no --seed fits: --n is at fault (the line blamed --seed=0, bound a negative number)
        raise BadInput(f"--n {n} is more than 2**63 images: image i uses seed + i, which must stay below 2**63")
    if seed > _MAX_SEED - (n - 1):
        raise BadInput(f"--seed={seed} is too large for --n {n}: image i uses seed + i, which must stay below "
                       f"2**63, so --seed must be at most 2**63 - n = {_MAX_SEED - (n - 1)}")
    from dpdm.report_utils import grid_suffix_problem, output_parent_problem

    grid_problem = grid_path is not None and grid_suffix_problem(grid_path)
    if grid_problem:
        raise BadInput(f"--grid={grid_path!r} {grid_problem}")
    for option, value in (("--out", out_path), ("--grid", grid_path)):   # before any sampling work
        problem = value is not None and output_parent_problem(value)
        if problem:
            raise BadInput(f"{option}={value!r}: {problem}")
    from dpdm.checkpoint import SEED_GIVEN_NOTE
    from dpdm.sample import SampleError, SampleFailure, sample_checkpoint, sampler_options_problem

    problem = sampler_options_problem(sampler, sampler_steps, rho, churn)   # given, recorded, and changing nothing
    if problem:
        raise BadInput(problem)
    device = resolve_device(device)
    warn_if_slow_bf16(precision, device)

    notes: list[str] = []   # e.g. how many images are of classes the run had no training image of
    facts: dict = {}   # the checkpoint's data digest, for the line on its run's .steps_done (never printed)
    try:
        result = sample_checkpoint(path, n=n, sampler=sampler, sampler_steps=sampler_steps, guidance=guidance,
                                   guidance_interval=guidance_interval, sampler_kwargs=churn or None,
                                   sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, weights=weights, seed=seed,
                                   precision=precision, batch_size=batch_size, device=device, out_path=out_path, grid_path=grid_path,
                                   force=force, notes=notes, facts=facts)
    except SampleError as e:
        raise BadInput(str(e)) from None
    except SampleFailure as e:   # NaN/inf with the default sampler settings too: the weights, exit 4
        raise runtime_failure(str(e)) from None
    for note in notes:
        warn(note)
    if result["private"] and result["seed_given"]:
        warn(f"the model was {SEED_GIVEN_NOTE}; the samples record that (meta_seed_given)")
    if not result["private"]:   # as `dpdm export` warns of its release file (h115 N1)
        warn_non_private(out_path, "samples of a NON-PRIVATE (--no-dp) model")
    warn_steps_past_checkpoint(path, result, "the samples'",   # a run stopped past its checkpoint (h131 F1)
                               data_digest=facts.get("data_digest"))
    if as_json:
        emit_json(result)
    else:
        mark = "" if result["private"] else "  [NON-PRIVATE]"
        # A model of an unfinished run says so, as `dpdm export`'s line does (h131 N1), and weights that hold fewer
        # steps' updates than the ledger counts (a divergence, --spend-unsaved-steps) say how many (h151 N1)
        held = discarded_note(result)
        step = (f" from step {result['steps_done']} of {result['plan_steps']}{held}"
                if result["steps_done"] < result["plan_steps"] or held else "")
        info(f"wrote {n} samples to {out_path}{step}{mark}" + (f", grid {grid_path}" if grid_path else ""))


def _churn_value(value, name: str) -> float:
    """`value`, or `sampling.sample_churn`'s default for the keyword `name` where it is None."""
    import inspect

    from dpdm.sampling import sample_churn

    return float(inspect.signature(sample_churn).parameters[name].default if value is None else value)
