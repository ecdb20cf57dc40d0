#!/usr/bin/env bash
# The GPU half of the checks as one command for a lent GPU machine (one device call, < 10 minutes):
# `pytest -m gpu` (kernels in bf16 vs float64, Megatron on CUDA), a tiny DePO run under `lcr profile`
# (per-phase seconds, tokens/s, MFU against the GPU's datasheet peak, NVML samples), then the kernel table (naive, chunked, Triton, Liger, torch) at the H100 shapes.
#   here:   bash benchmarks/gpu/fetch_wheels.sh           # what the GPU image may lack -> .whl/
#           bash benchmarks/gpu/check.sh --dry-run        # on CPU, ~1-2 minutes: every step, cheaply
#   device: run  command="bash benchmarks/gpu/check.sh"  carry=[".whl"]  timeout_s=600
# First benchmarks/gpu/install_missing.py installs from $WHEELS (default .whl) each package the check
# needs that is absent or too old into $SITE_DIR (default /tmp/site), first on PYTHONPATH; it stops the
# script, naming the package, if one is neither installed at a fitting version nor carried.
# Results go to $OUT (the device tool's return folder; else benchmarks/results/gpu_check/), 8 files:
# install.log, env.txt, pytest_gpu.log, e2e.log, e2e_metrics.jsonl, e2e_profile.{md,json}, kernels_cuda.{json,md},
# bench.log.
# The table runs last and rewrites its files after every case, so a time limit costs only its last
# cases; BUDGET_S (default 570) is the whole script's limit. The last line, "== check.sh end: ...",
# gives each step's exit status; the script exits 1 if the install, pytest or the tiny run failed.
# --dry-run (CPU, no GPU; tests/benchmarks/test_gpu_check.py runs it): no nvidia-smi, `pytest -m gpu
# --collect-only` (every test module imports on this Python), the tiny run for 1 smaller step, and a
# one-shape CPU table (kernels_cpu.{json,md}), so a broken step shows here, not in device time.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-benchmarks/results/gpu_check}
site=${SITE_DIR:-/tmp/site}
budget=${BUDGET_S:-570}
# Everything the dry run does differently, in one place.
case "${1:-}" in
    "")  dry=""; pytest_args=(); e2e_limit=150; e2e_args=(trainer.steps=3)
         table=(--device cuda --repeats 3 --out "$out/kernels_cuda") ;;
    --dry-run)
         dry=1; pytest_args=(--collect-only); e2e_limit=300
         e2e_args=(trainer.steps=1 trainer.prompts_per_step=4 data.longblocks.num_samples=64 data.num_eval=4)
         table=(--device cpu --shapes 64,32,256 --masks 0 --repeats 1 --out "$out/kernels_cpu") ;;
    *)   echo "usage: bash benchmarks/gpu/check.sh [--dry-run]" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

python3 benchmarks/gpu/install_missing.py "${WHEELS:-.whl}" "$site" 2>&1 | tee "$out/install.log"
rc_install=$?
if ((rc_install != 0)); then
    echo "== check.sh end: install=$rc_install (nothing else ran)"
    exit 1
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    [[ -n "$dry" ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 - <<'PY'
import sys, torch, triton
from importlib.metadata import PackageNotFoundError, version
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
for name in ("megatron-core", "liger-kernel", "transformers"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "absent")
PY
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== pytest -m gpu ${pytest_args[*]}"
timeout 200 python3 -m pytest -q -m gpu -rs -p no:cacheprovider "${pytest_args[@]}" 2>&1 |
    tee "$out/pytest_gpu.log"
rc_pytest=$?

echo "== tiny DePO run under lcr profile (${e2e_args[*]})"
run_dir=$(mktemp -d /tmp/lcr_e2e.XXXXXX)
steps=${e2e_args[0]#trainer.steps=}
timeout "$e2e_limit" python3 -m megatron_lcr.cli profile examples/tiny/depo.yaml --steps "$steps" --out "$run_dir/run" \
    data.num_eval=16 eval.interval=0 trainer.save_interval=0 trainer.tensorboard=false "${e2e_args[@]:1}" 2>&1 |
    tee "$out/e2e.log"
rc_e2e=$?
cp "$run_dir/run/metrics.jsonl" "$out/e2e_metrics.jsonl" 2>/dev/null
cp "$run_dir/run/profile.md" "$out/e2e_profile.md" 2>/dev/null
cp "$run_dir/run/profile.json" "$out/e2e_profile.json" 2>/dev/null
rm -rf "$run_dir"

left=$((budget - SECONDS))
echo "== kernel table (${left}s left)"
rc_kernels=skipped
if ((left > 30)); then
    timeout "$left" python3 benchmarks/bench_kernels.py "${table[@]}" > "$out/bench.log" 2>&1
    rc_kernels=$?
    echo "bench_kernels exit $rc_kernels (124: stopped by the budget; the files hold the cases it finished)"
fi

status="install=0 pytest=$rc_pytest e2e=$rc_e2e kernels=$rc_kernels${dry:+ (dry run)}"
echo "== check.sh end: $status ${SECONDS}s"
((rc_pytest == 0 && rc_e2e == 0))
