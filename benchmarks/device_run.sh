#!/usr/bin/env bash
# GPU correctness checks and stock-vs-fast benchmarks in one call on a lent GPU machine
# (one H100/H200, Python 3.12 + CUDA torch, no network, no fairseq), about 6 minutes.
#
# From a session of this workplace, with the device tool:
#   run(command="bash benchmarks/device_run.sh", carry=[".whl", ".gpu_fixtures"], timeout_s=420)
#
# Carried (both ignored through .git/info/exclude):
#   .whl/           Python 3.12 wheels of what the machine lacks: ve-fairseq 0.12.3, hydra-core,
#                   omegaconf, antlr4-python3-runtime, bitarray (its numpy, torch, sacrebleu, ... are used)
#   .gpu_fixtures/  the tiny fixture checkpoints (<model>/checkpoint_last.pt) and their data-bin (bin/),
#                   copied from a FASTSEQ_TOY_CACHE folder
# Writes under $OUT (at most 8 files come back): summary.txt (versions, then each step's exit
# and time), gpu_check.txt, gpu_check.md, search_fp32.txt, search_fp16.txt, search_bf16.txt. Every step
# has its own time limit, and a failing step does not stop the later ones. Every step compares
# the static-shape loop with CUDA graphs (variant `graphs`, --fast-cuda-graphs on) with stock and
# fast, with the host syncs per batch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_run_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

# step NAME SECONDS COMMAND...: run with a time limit, output to the console and $OUT/NAME.txt.
step() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started))s" | tee -a "$OUT/summary.txt"
}

{
    echo "=== install"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    echo "install: exit $?"
    nvidia-smi -L
    python3 -c 'import sys, torch, numpy; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), "numpy", numpy.__version__)'
    git log -1 --oneline 2>/dev/null
} 2>&1 | tee -a "$OUT/summary.txt"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

step gpu_check 130 python3 -m benchmarks.gpu_check --device cuda --out "$OUT" --fixtures .gpu_fixtures
# The ablation's module-path variants were measured on the GPU before (BENCHMARKS.md): the
# default loop, fused and the CUDA graphs here, at batch 1, 32 and 128.
step search_fp32 110 python3 -m benchmarks.search --device cuda --dtype fp32 --repeats 3 --variants fast fused graphs \
    --cases mt-beam5-b128-s256 mt-beam5-b32 mt-beam5-b1-s4 mt-greedy-b1-s4 sum-beam4-ngram3-b32-s64 mt-beam4-ngram3-b128-s256
for dtype in fp16 bf16; do
    step "search_$dtype" 60 python3 -m benchmarks.search --device cuda --dtype "$dtype" --repeats 3 \
        --variants fast fused graphs --cases mt-beam5-b128-s256 mt-beam5-b1-s4 sum-beam4-ngram3-b32-s64
done
echo "=== done in ${SECONDS}s; files in $OUT:"
ls -la "$OUT"
cat "$OUT/summary.txt"
