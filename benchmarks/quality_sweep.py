"""Quick protocol for choosing generator knobs (issue 4): a short DP run, then a cheap evaluation.

Trains a DP generator on mnist5k under an eps-10 plan of `--epochs` epochs (calibrated anew, so a
shorter run gets less noise per step than a full one), draws `--n` images (Euler, 20 steps) at each
`--guidance` weight and reports the synthetic -> real CNN accuracy (20 epochs) and the classifier
FD. Cheaper and noisier than benchmarks/quality.py (about +-2 points of CNN accuracy at n = 2000):
use it to rank knobs, and quality.py for the figures.

It scores on mnist5k's 1,000 held-out test digits, the images quality.py reports on: knobs ranked here make
quality.py's figures selected on their own test set, and so optimistic (docs/results-mnist5k.md says which
knobs were chosen this way). It never scores on the private training images: tuning on them would spend privacy
outside the plan.

    .venv/bin/python benchmarks/quality_sweep.py --out DIR [--epochs 20] [--K 1] [--precond v] [--lr 1e-3]
                                                 [--lr-schedule constant] [--train-sigma MIN MAX]
                                                 [--model small] [--guidance 0,1]
                                                 [--threads 1] [--eval-only]

`--model` takes a preset of dpdm/networks.py or a U-Net shape "NF/CH_MULT/BLOCKS" such as
"8/1,2,2/1" (nf 8, channel multipliers (1, 2, 2), one block per level; attention at the lowest
resolution), registered for this process only.

`--eval-only` evaluates DIR/run/checkpoint.pt as it is (another guidance on a finished run).
Several sweeps can share a 2-core machine with `--threads 1` and OMP_WAIT_POLICY=PASSIVE.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _argtypes import int_at_least, number  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=number(float, 0, above=True), default=20)
    ap.add_argument("--batch", type=int_at_least(1), default=256)
    ap.add_argument("--K", type=int_at_least(1), default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--precond", default="edm", choices=("edm", "v"))
    ap.add_argument("--model", default="small")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    ap.add_argument("--train-sigma", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="noise levels trained on (v only); sampling keeps to them")
    ap.add_argument("--n", type=int_at_least(1), default=2000)
    ap.add_argument("--guidance", default="0,1", help="comma-separated guidance weights to sample with")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--cache", default=None, help="reference-CNN cache folder (default: OUT/../cache)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    import quality

    try:
        register_model(a.model)
    except ValueError as e:
        ap.error(str(e))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = a.cache or str(out.resolve().parent / "cache")
    doc = quality.default_plan(epochs=a.epochs, batch_size=a.batch, noise_multiplicity=a.K)
    res: dict = {"args": vars(a), "steps": doc.plan.steps, "sigma": doc.plan.noise_multiplier}
    t0 = time.time()
    if not a.eval_only:
        # seed 0, as before quality.py drew secret seeds: every knob sees the same batches and noise (a paired
        # comparison). The sweep's runs rank knobs and are never released; they carry no DP guarantee.
        quality.train_generator(doc, out / "run", model=a.model, precond=a.precond, lr=a.lr, ema_decay=a.ema,
                                lr_schedule=a.lr_schedule, seed=0,
                                train_sigma=None if a.train_sigma is None else tuple(a.train_sigma))
    res["train_s"] = round(time.time() - t0)
    for g in [float(v) for v in a.guidance.split(",")]:
        t1 = time.time()
        p = out / f"s_g{g:g}.npz"
        quality.sample(out / "run", p, n=a.n, sampler_steps=20, guidance=g)
        ev = quality.evaluate_synthetic(p, classifiers=("cnn",), epochs=20, cache_dir=cache)
        res[f"g{g:g}"] = {"cnn": ev["classifiers"]["cnn"]["test_accuracy"], "fd": ev["classifier_fd"]["value"],
                          "seconds": round(time.time() - t1)}
        print(f"{a.out} guidance {g:g}: {res[f'g{g:g}']}", flush=True)
    (out / "res.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
