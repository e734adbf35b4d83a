"""bf16 autocast against fp32 for the two paths that may use it: sampling and the non-private step.

`dpdm sample --precision bf16` and `dpdm train --no-dp --precision bf16` (public pretraining) run the
network under torch.autocast(bfloat16). This measures, on the same network, images and seeds:

  sample      `dpdm.sampling.generate` (Euler) of --n images: images/s, and how far the bf16 images
              are from the fp32 ones (mean and max absolute difference in grey levels, 0..255)
  step        one non-private training step (`dpdm.train._nonprivate_grad_sum`, the --no-dp path)
              over --batch examples x K noise draws: ms/step, and the relative L2 distance of the
              bf16 gradient from the fp32 one

Rounds interleave fp32 and bf16 so that a slow phase of a shared machine hits both; the figures are
the minimum over rounds. The network is the preset at its initialisation with init_scale 1 (every
layer contributes; a trained checkpoint behaves alike: docs/performance.md, bf16). The speed-up depends on the CPU:
bf16 matrix units (Intel AMX, AVX512-BF16) make it faster, and without them it is slower.

    .venv/bin/python benchmarks/precision.py [--preset small] [--n 256] [--sampler-steps 10]
        [--batch 128] [--K 2] [--threads 2] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _argtypes import int_at_least  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def cpu_features() -> dict:
    """What torch reports of this CPU's bf16 support (private helpers; absent ones read None)."""
    import torch

    from dpdm.cpu import bf16_unit_probes

    return {"capability": torch.backends.cpu.get_cpu_capability(), **bf16_unit_probes()}


def measure(preset: str, n: int, sampler_steps: int, batch: int, K: int, rounds: int) -> dict:
    import torch

    from dpdm.loss import VLoss
    from dpdm.networks import build_network
    from dpdm.precond import VPrecond
    from dpdm.sampling import autocast_for, generate
    from dpdm.train import _nonprivate_grad_sum

    torch.manual_seed(0)
    D = VPrecond(build_network(preset, img_resolution=28, img_channels=1, num_classes=10, init_scale=1.0))
    params = dict(D.named_parameters())
    loss = VLoss()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((batch, 1, 28, 28), generator=g) * 2 - 1
    y = torch.randint(0, 10, (batch,), generator=g)
    sigma, noise = loss.draw(batch, K, (1, 28, 28), generator=g, device="cpu")
    D.eval()
    generate(D, n=8, sampler_steps=2, precision="bf16")   # warm-up: oneDNN picks its kernels
    generate(D, n=8, sampler_steps=2)
    sample_s = {p: [] for p in PRECISIONS}
    step_s = {p: [] for p in PRECISIONS}
    images, grads = {}, {}
    for _ in range(rounds):
        for p in PRECISIONS:
            t0 = time.perf_counter()
            images[p], _ = generate(D, n=n, sampler_steps=sampler_steps, batch_size=n, precision=p)
            sample_s[p].append(time.perf_counter() - t0)
            D.train()
            with autocast_for(p, "cpu"):
                _nonprivate_grad_sum(D, loss, [x, y, sigma, noise], True, params)      # warm-up
                t0 = time.perf_counter()
                grads[p], _ = _nonprivate_grad_sum(D, loss, [x, y, sigma, noise], True, params)
                step_s[p].append(time.perf_counter() - t0)
            D.eval()
    diff = (images["bf16"].int() - images["fp32"].int()).abs().float()
    g_diff = sum(float((grads["bf16"][k] - grads["fp32"][k]).square().sum()) for k in params) ** 0.5
    g_size = sum(float(grads["fp32"][k].square().sum()) for k in params) ** 0.5
    result = {"preset": preset, "parameters": sum(p.numel() for p in params.values()),
              "sample": {"n": n, "sampler_steps": sampler_steps},
              "step": {"batch": batch, "K": K},
              "pixel_diff_mean": float(diff.mean()), "pixel_diff_max": float(diff.max()),
              "grad_relative_diff": g_diff / g_size}
    for p in PRECISIONS:
        result["sample"][f"{p}_images_per_s"] = n / min(sample_s[p])
        result["step"][f"{p}_ms"] = 1e3 * min(step_s[p])
    result["sample"]["speedup"] = min(sample_s["fp32"]) / min(sample_s["bf16"])
    result["step"]["speedup"] = min(step_s["fp32"]) / min(step_s["bf16"])
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="network preset (small, mnist)")
    ap.add_argument("--n", type=int_at_least(1), default=256, help="images per sampling call")
    ap.add_argument("--sampler-steps", type=int_at_least(2), default=10, help="as `dpdm sample --sampler-steps`")
    ap.add_argument("--batch", type=int_at_least(1), default=128, help="examples per training step")
    ap.add_argument("--K", type=int_at_least(1), default=2, help="noise draws per example")
    ap.add_argument("--threads", type=int_at_least(1), default=2)
    ap.add_argument("--rounds", type=int_at_least(1), default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    feats = cpu_features()
    r = measure(args.preset, args.n, args.sampler_steps, args.batch, args.K, args.rounds)
    r["cpu"], r["threads"] = feats, args.threads
    s, st = r["sample"], r["step"]
    print(f"CPU: {feats}; {args.threads} threads; preset {r['preset']} ({r['parameters']:,} parameters)")
    print(f"sampling {s['n']} images x {s['sampler_steps']} steps: fp32 {s['fp32_images_per_s']:.1f} img/s, "
          f"bf16 {s['bf16_images_per_s']:.1f} img/s: {s['speedup']:.2f}x; images differ by "
          f"{r['pixel_diff_mean']:.2f} grey levels on average (max {r['pixel_diff_max']:.0f})")
    print(f"non-private step, batch {st['batch']} x K {st['K']}: fp32 {st['fp32_ms']:.0f} ms, "
          f"bf16 {st['bf16_ms']:.0f} ms: {st['speedup']:.2f}x; gradient relative difference "
          f"{r['grad_relative_diff']:.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
