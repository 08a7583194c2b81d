#!/usr/bin/env bash
# Fill every GPU row of experiments/bench/README.md on one NVIDIA GPU, in at most 10 minutes (issue #16).
#
#   experiments/bench/gpu.sh                  # on the GPU machine (from any folder); writes the README's GPU blocks
#   experiments/bench/gpu.sh --dry-run        # the same commands on the CPU at toy scale, into a temporary README
#   experiments/bench/gpu.sh --out-dir DIR    # where the log and JSON rows go (default: outputs/bench/gpu-<time>/)
#
# The parts, each under its own time limit (`timeout`), so the whole stays under 10 minutes on an H200 even when one
# part runs long; a part that fails or runs out of time is reported and the next one still runs:
#
#   part     command                                                        expected on an H200   limit
#   methods  run.py --prior sd21_base_random (SD 2.1 base, random weights,      ~4 min            320 s
#            512px, 4x64x64 latents, prior.dtype = float16 on a GPU): all
#            8 methods at batch 1 and 8 (2 warm-up + 8 timed steps), then
#            the speed options (--variants: channels-last, classic attention,
#            bfloat16, torch.compile ~1-2 min of it compiling); peak memory
#   nerf     nerf.py --samples 512 --resolutions 64 512: the official field,        ~30 s             80 s
#            512 samples per ray (a 512x512 training step at 512 samples does
#            not fit one GPU with the PyTorch hash grid: its row says "out of
#            memory")
#   official official.py --all --prior sd21_base_random --repeats 2 --steps 15     ~2 min            150 s
#            --warmup 3 --readme: the side by side with the official loops,
#            every method, in one process (the table is written after each
#            repetition; skipped with a line if the script is not here)
#
# run.py writes its method rows into the README as soon as they are measured, so a time-out during the speed
# options keeps them. Every block is one per device (`bench:gpu-sd21_base_random`, `bench_nerf:cuda`,
# `bench:official-gpu-sd21_base_random`, ...): a GPU run never replaces a CPU table.
#
# --dry-run runs the same parts on the CPU at toy scale (tiny_sd prior, batch 1 and 2, 1 warm-up + 2 timed steps,
# the speed options but torch.compile, NeRF renders of 8x8 and 16x16 at 4 samples) and writes the tables into a
# copy of the README in the output folder, never the real one: it checks the pipeline, not the numbers
# (tests/integration/test_bench_gpu_script.py runs it).
#
# Environment: PYTHON (default: python), HF_HUB_OFFLINE=1 (set here: nothing is downloaded).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

dry_run=0
out_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out-dir) out_dir="${2:?--out-dir needs a folder}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//; $d'; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

declare -A limit  # seconds per part
if [[ $dry_run -eq 1 ]]; then
    out_dir="${out_dir:-$(mktemp -d "${TMPDIR:-/tmp}/sdbridge-gpu-dry-run.XXXXXX")}"
    readme="$out_dir/README.md"
    export CUDA_VISIBLE_DEVICES=""  # the CPU even on a GPU machine: the toy numbers go in the CPU blocks of the copy
    prior=tiny_sd
    methods_args=(--batch-sizes 1 2 --warmup 1 --iters 2 --variants plain channels_last "classic attention" bfloat16)
    nerf_args=(--resolutions 8 16 --samples 4 --repeats 1)
    limit=([methods]=240 [nerf]=60 [official]=120)
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 \
        || ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu.sh: no NVIDIA GPU here (nvidia-smi or torch.cuda.is_available() says none); run it on a GPU" \
             "machine, or use --dry-run to exercise the pipeline on the CPU" >&2
        exit 1
    fi
    out_dir="${out_dir:-outputs/bench/gpu-$(date +%Y%m%d-%H%M%S)}"
    readme="experiments/bench/README.md"
    prior=sd21_base_random
    methods_args=(--batch-sizes 1 8 --warmup 2 --iters 8 --variants)
    nerf_args=(--samples 512 --resolutions 64 512)
    limit=([methods]=320 [nerf]=80 [official]=150)  # + up to 10 s each to stop: <= 580 s with the GPU check
fi
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
log="$out_dir/gpu.log"
[[ $dry_run -eq 0 ]] || cp experiments/bench/README.md "$readme"
cp "$readme" "$out_dir/README.before.md"  # the summary lists the blocks that changed

summary=()
failed=0
start_all=$SECONDS

# part NAME COMMAND...: run under the part's time limit, output to the terminal and the log; record the outcome.
part() {
    local name=$1 rc=0 t0=$SECONDS budget=${limit[$1]}
    shift
    echo "=== $name (limit ${budget} s): $(printf '%q ' "$@")" | tee -a "$log"
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$log" || rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0)) outcome=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        outcome="TIMED OUT after ${budget} s"; failed=1
    elif [[ $rc -ne 0 ]]; then
        outcome="FAILED (exit $rc)"; failed=1
    fi
    summary+=("$(printf '%-9s %-28s %4d s of %d s' "$name" "$outcome" "$took" "$budget")")
}

block() { sed -n "/<!-- $2:start -->/,/<!-- $2:end -->/p" "$1"; }  # block FILE MARKER: its lines

skip() {
    echo "=== $1: skipped: $2" | tee -a "$log"
    summary+=("$(printf '%-9s skipped: %s' "$1" "$2")")
}

{
    echo "gpu.sh $([[ $dry_run -eq 1 ]] && echo "--dry-run (CPU, toy scale)") at $(date -Is) on $(hostname)"
    commit="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "checkout: $commit$(git diff --quiet 2>/dev/null || echo ' (modified)')"
    [[ $dry_run -eq 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "README written: $readme"
} | tee -a "$log"

part methods "$PYTHON" experiments/bench/run.py --prior "$prior" "${methods_args[@]}" \
    --out "$out_dir/methods.json" --readme --readme-path "$readme"
part nerf "$PYTHON" experiments/bench/nerf.py "${nerf_args[@]}" --readme --readme-path "$readme"

official=experiments/bench/official.py
if [[ ! -f $official ]]; then
    skip official "$official is not in this checkout"
elif [[ $dry_run -eq 0 ]]; then
    part official "$PYTHON" "$official" --all --prior sd21_base_random --repeats 2 --steps 15 --warmup 3 --readme
else
    official_help="$("$PYTHON" "$official" --help 2>/dev/null || true)"
    quick=()
    [[ $official_help != *--quick* ]] || quick=(--quick)
    if [[ $official_help != *--readme-path* ]]; then
        skip official "$official has no --readme-path, and a dry run never writes the real README"
    else
        part official "$PYTHON" "$official" --all --prior tiny_sd ${quick[@]+"${quick[@]}"} --readme \
            --readme-path "$readme"
    fi
fi

total=$((SECONDS - start_all))
{
    echo
    echo "=== summary ($([[ $dry_run -eq 1 ]] && echo "dry run, CPU" || echo GPU)): $total s in all (budget 600 s)"
    printf '  %s\n' "${summary[@]}"
    if [[ -f $out_dir/methods.json ]]; then  # the performance issue's targets, from the rows just measured
        "$PYTHON" - "$out_dir/methods.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    if r["method"] in ("sds", "bridge"):
        print(f"  {r['method']:>6} at batch {r['batch']}: {r['ms_per_iter']:,.1f} ms / iter, overhead ratio "
              f"{r['overhead']:.2f} (target <= 1.15), {r['images_per_hour']:,.1f} images / hour (target >= 107)")
EOF
    fi
    echo "  README blocks written in $readme:"
    for marker in $(grep -o '<!-- bench[a-z_]*:[^ ]*:start -->' "$readme" | sed 's/<!-- \(.*\):start -->/\1/'); do
        [[ "$(block "$out_dir/README.before.md" "$marker")" == "$(block "$readme" "$marker")" ]] \
            || echo "    $marker"
    done
    echo "  log: $log"
    [[ $total -le 600 ]] || echo "  WARNING: over the 10-minute budget; lower --iters or drop a part"
} | tee -a "$log"
exit $failed
