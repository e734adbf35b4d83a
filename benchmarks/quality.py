"""Quality benchmark (issue 4, "Must show"): synthetic-data classifiers vs. a DP-SGD classifier.

On mnist5k at epsilon 10, delta 1e-5, under ONE locked plan:
  1. `dp_classifier_baseline`: the paper's comparison point, a GroupNorm CNN trained directly with
     DP-SGD under the plan (dpdm/baseline.py), tested on the 1,000 held-out real images.
  2. `evaluate_synthetic`: the paper's protocol on synthetic images (logreg / MLP / CNN trained on
     the samples, 90/10 synthetic split for model selection, tested on the same 1,000 real images)
     and the classifier FD.
The generator part (train a DP diffusion model under the same plan, sample 10,000 images) is added
by the lead through `run(..., samples=...)`; this script runs the baseline alone when no samples
are given.

Usage:
    .venv/bin/python benchmarks/quality.py [--plan plan.json] [--samples samples.npz] [--json out.json]

Slow (not a test): the baseline takes minutes on 2 CPU cores, the evaluation of 10,000 samples
about as long again. Figures print on stdout; --json writes them to a file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import accounting  # noqa: E402

DATASET = "mnist5k"
EPSILON = 10.0
DELTA = 1e-5
BATCH_SIZE = 256   # expected batch, as `dpdm plan`'s default for mnist5k
EPOCHS = 30.0      # steps = ceil(EPOCHS * N / BATCH_SIZE) = 469
PAPER_EPOCHS = 50  # downstream classifiers here train as long as the paper's (dpdm eval defaults are shorter)


def default_plan(*, epsilon: float = EPSILON, delta: float = DELTA, batch_size: int = BATCH_SIZE,
                 epochs: float = EPOCHS) -> accounting.PlanDocument:
    """A calibrated mnist5k plan (what `dpdm plan --eps 10 --delta 1e-5` makes by default)."""
    from dpdm.datasets import DATASET_SIZES

    size = DATASET_SIZES[DATASET]
    steps = max(1, math.ceil(round(epochs * size / batch_size, 9)))
    plan = accounting.PrivacyPlan(dataset_size=size, batch_size=batch_size, steps=steps,
                                  noise_multiplier=1.0, delta=delta, dataset_name=DATASET)
    return accounting.make_plan_document(plan.calibrate(epsilon=epsilon))


def dp_classifier_baseline(doc: accounting.PlanDocument, *, lr: float | None = None, seed: int = 0,
                           device: str = "cpu") -> dict:
    """`dpdm baseline dp-classifier` in Python: real test accuracy of a DP-SGD CNN under `doc`."""
    from dpdm.baseline import DEFAULT_LR, train_dp_classifier
    from dpdm.datasets import load_dataset

    name = doc.plan.dataset_name or DATASET
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    result = train_dp_classifier(doc.plan, train, test, lr=lr or DEFAULT_LR, seed=seed,
                                 device=device, progress=True)
    return {"epsilon": doc.epsilon, "delta": doc.plan.delta, "plan_digest": doc.digest, **result}


def evaluate_synthetic(samples_path: str | Path, *, dataset: str = DATASET, epochs=PAPER_EPOCHS,
                       cache_dir=None, seed: int = 0, device: str = "cpu") -> dict:
    """`dpdm eval` in Python: downstream accuracies and classifier FD of a samples.npz."""
    from dpdm.datasets import load_dataset, load_npz
    from dpdm.evaluate import evaluate_samples

    samples = load_npz(samples_path)
    return evaluate_samples(samples, load_dataset(dataset, "train"), load_dataset(dataset, "test"),
                            epochs=epochs, cache_dir=cache_dir, seed=seed, device=device,
                            progress=lambda m: print(m, file=sys.stderr))


def run(*, plan_path: str | None = None, samples: str | None = None, device: str = "cpu") -> dict:
    doc = accounting.load_plan(plan_path) if plan_path else default_plan()
    out: dict = {"dataset": doc.plan.dataset_name, "plan": doc.to_dict()}
    t0 = time.perf_counter()
    out["dp_classifier"] = dp_classifier_baseline(doc, device=device)
    if samples is not None:
        out["synthetic"] = evaluate_synthetic(samples, dataset=doc.plan.dataset_name or DATASET,
                                              device=device)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", help="a locked plan (default: mnist5k, eps 10, delta 1e-5, batch 256, 469 steps)")
    ap.add_argument("--samples", help="samples.npz made under the same plan")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    out = run(plan_path=args.plan, samples=args.samples, device=args.device)
    plan = out["plan"]
    b = out["dp_classifier"]
    print(f"plan: {plan['dataset']['name']} N={plan['dataset']['size']} batch={plan['batch_size']} "
          f"steps={plan['steps']} sigma={plan['noise_multiplier']:.4f} eps={b['epsilon']:.4g} "
          f"delta={b['delta']:g}")
    print(f"DP-SGD CNN (GroupNorm, Adam lr {b['lr']:g}): real test accuracy {b['test_accuracy']:.4f} "
          f"({b['seconds']:.0f} s)")
    if "synthetic" in out:
        from cli.eval import format_report

        print(format_report(out["synthetic"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
