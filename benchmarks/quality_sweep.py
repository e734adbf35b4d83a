"""Quick protocol for choosing generator knobs (issue 4): a short DP run, then a cheap evaluation.

Trains a DP generator on mnist5k under an eps-10 plan of `--epochs` epochs (calibrated anew, so a
shorter run gets less noise per step than a full one), draws `--n` images (Euler, 20 steps) at each
`--guidance` weight and reports the synthetic -> real CNN accuracy (20 epochs) and the classifier
FD. Cheaper and noisier than benchmarks/quality.py (about +-2 points of CNN accuracy at n = 2000):
use it to rank knobs, and quality.py for the figures.

Rank knobs by the CNN accuracy. It is scored on mnist5k's 1,000 held-out test digits, the images quality.py
reports on: knobs ranked here make quality.py's figures selected on their own test set, and so optimistic
(docs/results-mnist5k.md says which knobs were chosen this way). The classifier FD is NOT such a score: it is
computed without privacy from the private training images (a reference CNN trained on them, and their features'
statistics), so the sweep prints it marked NON-PRIVATE and res.json lists it under
"non_private_statistics_of_the_training_data", as `dpdm eval` does. Choosing knobs by it would tune on the private
images, spending privacy outside the plan: read it, do not rank by it.

Its runs train with the public seed 0, so that every knob sees the same batches and noise (a paired comparison):
they carry no DP guarantee, are never released, and res.json says "seeded": true.

    .venv/bin/python benchmarks/quality_sweep.py --out DIR [--epochs 20] [--batch 256] [--K 1] [--precond edm]
                                                 [--lr 3e-4] [--ema 0.999] [--lr-schedule constant]
                                                 [--train-sigma MIN MAX] [--model small] [--n 2000]
                                                 [--guidance 0,1] [--threads 1] [--cache DIR] [--eval-only]

The generator's defaults are `dpdm train`'s (edm, lr 3e-4); the knobs chosen for this scale are `--precond v
--lr 1e-3`, quality.py's defaults (with edm and 3e-4 the short runs drew no digit shapes, docs/results-mnist5k.md).

`--model` takes a preset of dpdm/networks.py or a U-Net shape "NF/CH_MULT/BLOCKS" such as
"8/1,2,2/1" (nf 8, channel multipliers (1, 2, 2), one block per level; attention at the lowest
resolution), registered for this process only.

`--eval-only` evaluates DIR/run/checkpoint.pt as it is (another guidance on a finished run): res.json then records
that run's own plan and knobs (its plan.json and checkpoint; "epochs" is its steps x batch / N), and the options
that shape training are refused. Every option is checked before the generator trains.
Several sweeps can share a 2-core machine with `--threads 1` and OMP_WAIT_POLICY=PASSIVE.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _argtypes import int_at_least, number  # noqa: E402

# The options that shape the training run and their defaults (the generator's are `dpdm train`'s); None in argparse
# means not given (--eval-only refuses them).
TRAINING = {"epochs": 20.0, "batch": 256, "K": 1, "lr": 3e-4, "precond": "edm", "model": "small", "ema": 0.999,
            "lr_schedule": "constant", "train_sigma": None}
SAMPLER_STEPS = 20


def guidance_weights(text: str) -> list[float]:
    """argparse type: comma-separated guidance weights, each a finite number >= 0, each once ("0,1")."""
    weight = number(float, 0)
    try:
        weights = [weight(v.strip()) for v in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; give comma-separated weights >= 0, such as 0,1") from None
    if len(set(weights)) < len(weights):
        raise argparse.ArgumentTypeError(f"{text!r} names a weight twice; give each once")
    return weights


def register_model(spec: str) -> str:
    """A preset name as it is, or "NF/CH_MULT/BLOCKS" registered as a preset of that name."""
    from dpdm import networks

    if spec in networks.PRESETS:
        return spec
    try:
        nf, mult, blocks = spec.split("/")
        preset = networks.Preset(int(nf), tuple(int(m) for m in mult.split(",")), int(blocks))
    except ValueError:
        raise ValueError(f"--model={spec!r} is neither a preset ({sorted(networks.PRESETS)}) nor NF/CH_MULT/BLOCKS") from None
    networks.PRESETS[spec] = preset
    return spec


def run_record(run: Path) -> dict:
    """What the run in `run` was trained with, from its own files: its plan.json (steps, noise multiplier, batch,
    K), against which its checkpoint's ledger is checked, and its checkpoint (the knobs, the steps done, whether
    it is private and whether its seed was given). Raises CheckpointError (a ValueError)."""
    import quality
    from dpdm import checkpoint as ckpt

    ck = run / "checkpoint.pt"
    state = ckpt.load_checkpoint(ck)
    doc = ckpt.verify_run_ledger(ck, state, missing=f"{run}: no plan.json beside {ck}; put the run's plan.json back")
    ledger, config = state["ledger"], state["config"]
    had, plan = quality._run_settings(config), doc.plan
    knobs = {"epochs": plan.steps * plan.batch_size / plan.dataset_size, "batch": plan.batch_size,
             "K": plan.noise_multiplicity, "lr": had["lr"], "precond": had["precond"], "model": had["model"],
             "ema": had["ema_decay"], "lr_schedule": had["lr_schedule"], "train_sigma": had["train_sigma"]}
    return {"steps": plan.steps, "sigma": plan.noise_multiplier, "steps_done": int(ledger["steps_done"]),
            "private": bool(ledger["private"]), "seeded": ckpt.seed_given(config), "knobs": knobs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=number(float, 0, above=True), default=None,
                    help=f"epochs of the plan (default {TRAINING['epochs']:g})")
    ap.add_argument("--batch", type=int_at_least(1), default=None,
                    help=f"expected batch of the plan (default {TRAINING['batch']})")
    ap.add_argument("--K", type=int_at_least(1), default=None,
                    help=f"noise multiplicity of the plan (default {TRAINING['K']})")
    ap.add_argument("--lr", type=number(float, 0, above=True), default=None,
                    help=f"generator Adam learning rate (default {TRAINING['lr']:g})")
    ap.add_argument("--precond", default=None, choices=("edm", "v"), help=f"default {TRAINING['precond']}")
    ap.add_argument("--model", default=None, help=f"default {TRAINING['model']}")
    ap.add_argument("--ema", type=number(float, 0, below=1), default=None,
                    help=f"generator EMA decay (default {TRAINING['ema']:g})")
    ap.add_argument("--lr-schedule", default=None, choices=("constant", "cosine"),
                    help=f"default {TRAINING['lr_schedule']}")
    ap.add_argument("--train-sigma", type=number(float, 0, above=True), nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="noise levels trained on (v only); sampling keeps to them")
    ap.add_argument("--n", type=int_at_least(1), default=2000)
    ap.add_argument("--guidance", type=guidance_weights, default=[0.0, 1.0],
                    help="comma-separated guidance weights to sample with (default 0,1)")
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate OUT/run as it was trained (refuses the options that shape training)")
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--cache", default=None, help="reference-CNN cache folder (default: OUT/../cache)")
    a = ap.parse_args(argv)
    given = ["--" + k.replace("_", "-") for k in TRAINING if getattr(a, k) is not None]

    def fail(message: str) -> NoReturn:   # one line, exit 2, as quality.py refuses (argparse's usage adds nothing here)
        ap.exit(2, f"{ap.prog}: error: {message}\n")

    import torch

    torch.set_num_threads(a.threads)
    import quality
    from dpdm.evaluate import NON_PRIVATE_KEY, cache_folder_problem

    out = Path(a.out)
    run = out / "run"
    record = None
    if a.eval_only:
        if given:
            fail(f"--eval-only evaluates {run} as it was trained: {', '.join(given)} shape only training; "
                 "leave them out")
        if not (run / "checkpoint.pt").is_file():
            fail(f"--eval-only: {run / 'checkpoint.pt'}: no such file; train it first (leave out --eval-only)")
        try:
            record = run_record(run)
        except ValueError as e:   # CheckpointError
            fail(f"--eval-only: {e}")
        vars(a).update(record["knobs"])   # res.json's args: the run evaluated, not the command line
    else:
        vars(a).update({k: v for k, v in TRAINING.items() if getattr(a, k) is None})
    try:
        register_model(a.model)
    except ValueError as e:
        fail(str(e))
    # Checked here, not once the generator has trained (h100 F3), as quality.py does.
    if a.train_sigma is not None and not a.eval_only:
        if not 1e-10 <= a.train_sigma[0] < a.train_sigma[1] <= 1e10:
            fail(f"--train-sigma {a.train_sigma[0]:g} {a.train_sigma[1]:g}: MIN must be below MAX, both in "
                 "[1e-10, 1e+10] (as `dpdm train --train-sigma`)")
        if a.precond != "v":
            fail("--train-sigma applies to --precond v only (as `dpdm train`)")
    problem = quality.schedule_problem(train_sigma=a.train_sigma)
    if problem:
        fail(problem)
    cache = a.cache or str(out.resolve().parent / "cache")
    _, problem = cache_folder_problem(cache)
    if problem:
        fail(f"--cache {cache}: {problem}")
    if not a.eval_only:
        try:
            doc = quality.default_plan(epochs=a.epochs, batch_size=a.batch, noise_multiplicity=a.K)
        except ValueError as e:   # e.g. a batch above the dataset's size
            fail(f"--epochs {a.epochs:g}, --batch {a.batch}, --K {a.K}: {e}")

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not a.eval_only:
        # seed 0, as before quality.py drew secret seeds: every knob sees the same batches and noise (a paired
        # comparison). The sweep's runs rank knobs and are never released; they carry no DP guarantee.
        quality.train_generator(doc, run, model=a.model, precond=a.precond, lr=a.lr, ema_decay=a.ema,
                                lr_schedule=a.lr_schedule, seed=0,
                                train_sigma=None if a.train_sigma is None else tuple(a.train_sigma))
    train_s = round(time.time() - t0)
    record = record or run_record(run)
    res: dict = {"args": vars(a), **{k: record[k] for k in ("steps", "sigma", "steps_done", "private", "seeded")},
                 "train_s": train_s, NON_PRIVATE_KEY: []}
    for g in a.guidance:
        t1 = time.time()
        p = out / f"s_g{g:g}.npz"
        quality.sample(run, p, n=a.n, sampler_steps=SAMPLER_STEPS, guidance=g)
        ev = quality.evaluate_synthetic(p, classifiers=("cnn",), epochs=20, cache_dir=cache)
        fd = None if ev["classifier_fd"] is None else ev["classifier_fd"]["value"]
        res[f"g{g:g}"] = {"cnn": ev["classifiers"]["cnn"]["test_accuracy"], "fd": fd,
                          "seconds": round(time.time() - t1)}
        # dpdm.evaluate's mark, kept: the FD comes from the private training images (h100 F2)
        private_fd = "classifier_fd.value" in ev[NON_PRIVATE_KEY]
        if private_fd:
            res[NON_PRIVATE_KEY].append(f"g{g:g}.fd")
        fd_text = ("not computed" if fd is None else f"{fd:.4g}" +
                   (" (NON-PRIVATE: from the private training images; do not rank knobs by it)" if private_fd else ""))
        print(f"{a.out} guidance {g:g}: CNN {res[f'g{g:g}']['cnn']:.4f} on the held-out test digits; "
              f"FD {fd_text}; {res[f'g{g:g}']['seconds']} s", flush=True)
    (out / "res.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
