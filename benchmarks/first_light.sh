#!/usr/bin/env bash
# First light on a GPU: one command, at most 9 minutes on an H100/H200, that comes back with
# the figures behind every bar of issue 20 (benchmarks/README.md, "First light"):
#
#   bash benchmarks/first_light.sh                      # on the GPU box, from any folder
#   bash benchmarks/first_light.sh --device cpu --tiny  # CPU dry run (CI: tests/test_first_light.py)
#
# Phases, most valuable first, each its own process under a time limit, all logged to
# $OUT/first-light.log as they run:
#   env       GPU, driver, torch, CUDA, triton, C compiler, Python.h, libcuda, prefops' settings, the peers
#   smoke     a trivial Triton kernel; the out_dtype GEMM; linear_logprobs and the default, lean and
#             budget DPO loss in bf16 against float64 / fp32
#   core      floor, default (with the path it ran), lean, naive, budget and forward-only at A, Q, L
#   peers     TRL's fused head, Liger, CCE, torch.compile at A, while time is left
#   families  TDPO2, listwise Plackett-Luce and the sigmoid head over logps-only at A, default strategy
#   sweep     every autotune config of the GEMM-fused kernels against cuBLAS at A (~60 s)
#   training  1B Llama step at 4 pairs x 2048: prefops default, TRL, naive (tokens/s, step peak)
# then summary.md: every bar, pass, fail or not run. Records go to results.jsonl as they are made, so
# a phase stopped at its limit keeps what it finished. Three files in all: the device tool brings
# back at most 8. Nothing is installed: the checkout goes on PYTHONPATH (prefops/__init__.py maps
# kernels/ and training/), and the peers' wheels from .whl (benchmarks/fetch_wheels.sh) into a side
# folder with --target.
#
# Environment: OUT (default ./first-light), FIRST_LIGHT_SECONDS (540), FIRST_LIGHT_WHEELS (.whl;
# empty for none), PYTHON (python3), PREFOPS_AUTOTUNE (quick: two configs a kernel; the sweep
# phase times them all).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

device=cuda
tiny=()
while (($#)); do
    case $1 in
        --device)
            device=${2:-}
            shift 2 || shift ;;
        --tiny)
            tiny=(--tiny)
            shift ;;
        *)
            echo "unknown option $1; options: --device cuda|cpu, --tiny" >&2
            exit 2 ;;
    esac
done
if [[ $device != cuda && $device != cpu ]]; then
    echo "--device must be cuda or cpu; got '$device'" >&2
    exit 2
fi

out=${OUT:-first-light}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/first-light.log
rm -f "$log" "$out"/results.jsonl "$out"/summary.md
python=${PYTHON:-python3}
total=${FIRST_LIGHT_SECONDS:-540}
reserve=15  # for the summary
deadline=$(($(date +%s) + total - reserve))

export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 PREFOPS_AUTOTUNE=${PREFOPS_AUTOTUNE:-quick}
[[ $device == cpu ]] && export TRITON_INTERPRET=1

wheels=${FIRST_LIGHT_WHEELS-.whl}
site=
if [[ -n $wheels ]] && compgen -G "$wheels/*.whl" >/dev/null; then
    site=/tmp/site
    echo "== installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site" | tee -a "$log"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl 2>&1 | tee -a "$log"
fi
export PYTHONPATH=$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}

phase() {  # name, its own cap in seconds: run it under the smaller of the cap and the time left
    local name=$1 cap=$2 left limit begin rc
    left=$((deadline - $(date +%s)))
    limit=$((cap < left ? cap : left))
    begin=$(date +%s)
    if ((limit < 10)); then
        echo "== $name: skipped, ${left} s left" | tee -a "$log"
        rc=-1
    else
        echo "== $name: at most ${limit} s" | tee -a "$log"
        timeout -k 5 "$limit" "$python" benchmarks/first_light.py "$name" --out "$out" --device "$device" \
            "${tiny[@]}" --deadline "$deadline" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
    fi
    printf '{"phase": "%s", "kind": "phase", "rc": %d, "seconds": %d}\n' "$name" "$rc" $(($(date +%s) - begin)) \
        >>"$out/results.jsonl"
}

{
    echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) CPUs, PYTHONPATH=$PYTHONPATH"
    command -v nvidia-smi >/dev/null && nvidia-smi
} 2>&1 | tee -a "$log"
# Caps: what each took on an H200 (2026-12-04: env 21 s, smoke 26, core 47, peers 47) with room for
# the new rows and a slower start; a phase never runs past the time left.
phase env 60
phase smoke 120
phase core 180
phase peers 150
phase families 120
phase sweep 75
phase training 150
"$python" benchmarks/first_light.py summary --out "$out" "${tiny[@]}"
