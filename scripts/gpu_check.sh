#!/usr/bin/env bash
# The GPU checks of issue #14, as one script a session with a GPU runs as-is:
#
#     bash scripts/gpu_check.sh                                   # on the GPU
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 bash scripts/gpu_check.sh  # dry run
#
# from the repository root. Everything goes under "${OUT:-runs/gpu_check}": a log
# and (where the part writes one) a JSON file per part, and summary.txt. The
# parts, in priority order, each under its own `timeout` and all within one
# budget (GPU_CHECK_BUDGET seconds, default 450: the whole script stays under
# 8 minutes, CUDA's start in every process included); a part that fails or
# runs out of time does not stop the next one, and a part with less than
# GPU_CHECK_MIN_PART seconds (default 20) of budget left is skipped:
#
#   a1  pytest -m gpu (the library's CUDA tests; the benchmarks' tiny runs on
#       cuda under a meta default device)
#   a2  pytest tests/test_default_device.py
#   b   benchmarks/block_products.py: mlp, test_resnet, resnet18; hessian and ggn
#   c   benchmarks/probes.py overhead: resnet18, batch 128, probe batch 128,
#       a NoiseProbe every 400 steps (target: <= 1.10 x plain SGD)
#   d   benchmarks/curvature.py --quick (our tools; the peers are skipped on cuda)
#   e   benchmarks/optimizers.py --quick
#
# GPU_CHECK_DEVICE (default cuda) is the benchmarks' --device; GPU_CHECK_TINY=1
# gives every part tiny settings (a dry run of the script on a CPU, minutes).
# Everything is also packed into $OUT/gpu_check.tar.gz; GPU_CHECK_PACK=1 then
# leaves only that archive and summary.txt (for a tool that returns few files).
# Python: $GPU_CHECK_PYTHON if set, else .venv/bin/python when it imports torch,
# else python3 / python. The
# repository root goes first on PYTHONPATH (the .venv's editable install may
# point at another checkout). Exit status: 0 when every part passed, else 1.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
TINY="${GPU_CHECK_TINY:-0}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
MIN_PART="${GPU_CHECK_MIN_PART:-20}"
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

PY=""
for candidate in ${GPU_CHECK_PYTHON:-} .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c "import torch" >/dev/null 2>&1; then
        PY=$candidate
        break
    fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: no python that imports torch (.venv/bin/python, python3, python)"
    exit 1
fi

SUMMARY="$OUT/summary.txt"
PARTS="$OUT/parts.txt"
: >"$PARTS"
FAILED=0

note() { echo "$*" | tee -a "$PARTS"; }

# run_part NAME CAP_SECONDS COMMAND...: the command under `timeout`, its output
# in $OUT/NAME.log; one summary line (ok / FAILED rc / TIMEOUT / SKIPPED)
run_part() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt "$MIN_PART" ]; then
        note "$(printf '%-3s SKIPPED (budget: %ss left)' "$name" "$left")"
        FAILED=1
        return
    fi
    echo "== $name (timeout ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    [ "$rc" -eq 0 ] || FAILED=1
    [ "$rc" -eq 0 ] || tail -n 15 "$OUT/$name.log"
    note "$(printf '%-3s %-22s %4ss  %s' "$name" "$status" "$(($(date +%s) - t0))" "$*")"
}

{
    echo "gpu_check: device $DEVICE, tiny $TINY, budget ${BUDGET}s, out $OUT"
    echo "python: $PY ($(command -v "$PY")), git $(git rev-parse --short HEAD 2>/dev/null)"
    "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}", end="")
if torch.cuda.is_available():
    print(f", {torch.cuda.get_device_name(0)}", end="")
print()
EOF
    command -v nvidia-smi >/dev/null 2>&1 &&
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} 2>&1 | tee "$OUT/preflight.txt"
if [ "${DEVICE%%:*}" = cuda ] &&
    ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    note "WARNING: --device $DEVICE but torch sees no CUDA: pytest -m gpu skips, the benchmarks exit 2"
    FAILED=1
fi

B="$ROOT/benchmarks"
if [ "$TINY" = 1 ]; then
    BP_ARGS=(--models mlp test_resnet resnet18 --blocks 1 2 --resnet18-blocks 1 2
        --reps 1)
    PR_ARGS=(--quick --models test_resnet --probe-batch 8 --k 2 --steps 4
        --run-every 2)
    CV_ARGS=(--quick --models mlp --ks 2 --seeds 1 --hvp-reps 1
        --tools geoopt_sgd geoopt_sgd_unchecked)
    OP_ARGS=(--quick --repeats 2 --block 2)
else
    BP_ARGS=(--models mlp test_resnet resnet18 --resnet18-blocks 1 4 8 16)
    # not --quick: batch 128, probe batch 128, k 10; probes at steps 400, 800
    # and 1200 (the first one cold: the projected ratio uses the warm ones)
    PR_ARGS=(--models resnet18 --steps 1200 --run-every 400)
    CV_ARGS=(--quick)
    OP_ARGS=(--quick)
fi

run_part a1 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs
run_part a2 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_default_device.py
run_part b 120 "$PY" "$B/block_products.py" "${BP_ARGS[@]}" --operators hessian ggn \
    --device "$DEVICE" --out "$OUT/block_products.json"
run_part c 200 "$PY" "$B/probes.py" "${PR_ARGS[@]}" --sections overhead --every 400 \
    --device "$DEVICE" --out "$OUT/probes_overhead.json"
run_part d 150 "$PY" "$B/curvature.py" "${CV_ARGS[@]}" --device "$DEVICE" \
    --out "$OUT/curvature.json"
run_part e 90 "$PY" "$B/optimizers.py" "${OP_ARGS[@]}" --device "$DEVICE" \
    --out "$OUT/optimizers.json"

echo
echo "== summary ($(($(date +%s) - START))s in all; logs and JSON in $OUT)"
cp "$PARTS" "$SUMMARY"
cat "$PARTS"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$SUMMARY"
"""Key numbers of each part's JSON (what exists of it)."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


def part(name, fn):
    try:
        fn()
    except Exception as e:  # a partial or unexpected file: say so, go on
        print(f"{name}: could not summarise ({type(e).__name__}: {e})")


def block_products():
    res = load("block_products.json")
    if res is None:
        return print("b: no block_products.json")
    print(f"b: per-column cost in gradients ({res['env'].get('gpu', res['env']['device'])})")
    for p in res["problems"]:
        cols = ", ".join(
            f"q={r['q']} loop {r['loop_per_column']:.2f} batched "
            f"{r['batched_per_column']:.2f}"
            for r in p["rows"]
        )
        print(f"   {p['model']:11s} {p['operator']:7s} grad "
              f"{p['grad_seconds'] * 1e3:7.2f} ms: {cols}")


def probes():
    res = load("probes_overhead.json")
    if res is None or "overhead" not in res:
        return print("c: no probe overhead result")
    o = res["overhead"]
    print(
        f"c: {o['model']} batch {o['batch']}, probe every {o['run_every']} of "
        f"{o['steps']} steps: step {o['t_step_mean'] * 1e3:.1f} ms, probes "
        + ", ".join(f"{s:.2f}" for s in o["probe_seconds"])
        + f" s; measured ratio {o['measured_ratio']:.3f} (cold probe included), "
        f"projected to every {o['every']}: {o['projected_ratio']:.3f} "
        f"(target <= 1.10)"
    )


def curvature():
    res = load("curvature.json")
    if res is None:
        return print("d: no curvature.json")
    for p in res["problems"]:
        c = p.get("hvp_cost", {})
        print(f"d: {p['model']} P={p['P']:,}: HVP {c.get('hvp_in_gradients', 0):.2f} "
              f"gradients ({c.get('method')})")
        for r in p["runs"]:
            if "n_hvp" in r:
                print(f"   {r['tool']:24s} k={r['k']:3d} {r['n_hvp']:7.1f} HVPs "
                      f"{r['seconds']:8.3f} s  err {r['max_rel_err']:.1e} "
                      f"missed {r['missed']}")
            else:
                why = [r.get(k) for k in ("not_applicable", "not_installed", "crashed")]
                print(f"   {r['tool']:24s} k={r['k']:3d} {next(w for w in why if w)}")


def optimizers():
    res = load("optimizers.json")
    if res is None:
        return print("e: no optimizers.json")
    s = res["step_alone"]
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in s["paired_ratio_vs_sgd"].items())
    print(f"e: {s['model']} step alone, x SGD (paired): {ratios}")
    h = (res.get("noisy_gd") or {}).get("hessian_noise")
    if h:
        print(f"   hessian noise: {h['hvp_per_step']:.1f} HVPs/step, "
              f"{h['ratio_vs_sgd']:.2f}x SGD's train step")


for name, fn in (("b", block_products), ("c", probes), ("d", curvature),
                 ("e", optimizers)):
    part(name, fn)
EOF
RESULT=$([ "$FAILED" = 0 ] && echo "all parts ok" || echo "SOME PARTS FAILED")
echo "total $(($(date +%s) - START))s; $RESULT" | tee -a "$SUMMARY"
# everything in one archive beside the loose files; GPU_CHECK_PACK=1 keeps only
# the archive and summary.txt (the device tool brings back at most 8 files)
PACKED=$(mktemp "${TMPDIR:-/tmp}/gpu_check.XXXXXX") &&
    tar -czf "$PACKED" -C "$OUT" --exclude ./gpu_check.tar.gz . &&
    mv "$PACKED" "$OUT/gpu_check.tar.gz"
if [ "${GPU_CHECK_PACK:-0}" = 1 ] && [ -f "$OUT/gpu_check.tar.gz" ]; then
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name gpu_check.tar.gz ! -name summary.txt \
        -exec rm -rf {} +
fi
exit "$FAILED"
