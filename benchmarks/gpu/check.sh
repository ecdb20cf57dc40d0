#!/usr/bin/env bash
# The GPU half of the checks as one command for a lent GPU machine (one device call, < 10 minutes):
# `pytest -m gpu` (kernels in bf16 vs float64, Megatron on CUDA), a tiny `lcr train` DePO run with
# per-phase timings, then the kernel table (naive, chunked, Triton, Liger, torch) at the H100 shapes.
#   here:   bash benchmarks/gpu/fetch_wheels.sh           # the packages the GPU image lacks -> .whl/
#   device: run  command="bash benchmarks/gpu/check.sh"  carry=[".whl"]  timeout_s=600
# Results go to $OUT (the device tool's return folder; else benchmarks/results/gpu_check/), 8 files:
# env.txt, pytest_gpu.log, e2e.log, e2e_metrics.jsonl, kernels_cuda.json, kernels_cuda.md, bench.log.
# The table runs last and rewrites its files after every case, so a time limit costs only its last
# cases; BUDGET_S (default 570) is the whole script's limit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-benchmarks/results/gpu_check}
budget=${BUDGET_S:-570}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 benchmarks/gpu/install_missing.py "${WHEELS:-.whl}" /tmp/site || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
                "cuda", torch.version.cuda, "triton", triton.__version__)'
    python3 -c 'from importlib.metadata import version as v; print("megatron-core", v("megatron-core"))'
    python3 -c 'from importlib.metadata import version as v; print("liger-kernel", v("liger-kernel"))'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== pytest -m gpu"
timeout 200 python3 -m pytest -q -m gpu -rs -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log"

echo "== tiny DePO run (3 steps)"
rm -rf /tmp/lcr_e2e
timeout 150 python3 -m megatron_lcr.cli train examples/tiny/depo.yaml --out /tmp/lcr_e2e trainer.steps=3 \
    data.num_eval=16 eval.interval=0 trainer.save_interval=0 trainer.tensorboard=false 2>&1 | tee "$out/e2e.log"
cp /tmp/lcr_e2e/metrics.jsonl "$out/e2e_metrics.jsonl" 2>/dev/null

left=$((budget - SECONDS))
echo "== kernel table (${left}s left)"
if ((left > 30)); then
    timeout "$left" python3 benchmarks/bench_kernels.py --device cuda --repeats 3 --out "$out/kernels_cuda" \
        > "$out/bench.log" 2>&1
    echo "bench_kernels exit $? (124: stopped by the budget; the files hold the cases it finished)"
fi
