#!/usr/bin/env bash
# First light on a GPU: one command, at most 9 minutes on an H100/H200, that comes back with
# the core figures against every peer (benchmarks/README.md, "First light"):
#
#   bash benchmarks/first_light.sh                      # on the GPU box, from any folder
#   bash benchmarks/first_light.sh --device cpu --tiny  # CPU dry run (CI: tests/test_first_light.py)
#
# Phases, each its own process under a time limit, each logged to $OUT/<phase>.log as it runs:
#   env    GPU, driver, torch, CUDA, triton, C compiler, Python.h, libcuda, the peers' imports
#   smoke  a trivial Triton kernel; the out_dtype GEMM; linear_logprobs and the lean and budget
#          DPO loss in bf16 against float64 / fp32
#   core   floor, naive, lean, budget and forward-only at A, Q, L
#   peers  TRL's fused head, Liger, CCE, torch.compile at A, while time is left
# then summary.md: every bar, pass or fail. Records go to results.jsonl as they are made, so a
# phase stopped at its limit keeps what it finished. Nothing is installed: the checkout goes on
# PYTHONPATH (prefops/__init__.py maps kernels/ and training/), and the peers' wheels from .whl
# (benchmarks/fetch_wheels.sh) into a side folder with --target.
#
# Environment: OUT (default ./first-light), FIRST_LIGHT_SECONDS (540), FIRST_LIGHT_WHEELS (.whl;
# empty for none), PYTHON (python3), PREFOPS_AUTOTUNE (quick: two configs a kernel).
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
rm -f "$out"/{env,smoke,core,peers}.log "$out"/results.jsonl "$out"/summary.md
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
    echo "== installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site" | tee -a "$out/env.log"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl 2>&1 | tee -a "$out/env.log"
fi
export PYTHONPATH=$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}

phase() {  # name, its own cap in seconds: run it under the smaller of the cap and the time left
    local name=$1 cap=$2 left limit begin rc
    left=$((deadline - $(date +%s)))
    limit=$((cap < left ? cap : left))
    begin=$(date +%s)
    if ((limit < 10)); then
        echo "== $name: skipped, ${left} s left" | tee -a "$out/$name.log"
        rc=-1
    else
        echo "== $name: at most ${limit} s" | tee -a "$out/$name.log"
        timeout -k 5 "$limit" "$python" benchmarks/first_light.py "$name" --out "$out" --device "$device" \
            "${tiny[@]}" --deadline "$deadline" 2>&1 | tee -a "$out/$name.log"
        rc=${PIPESTATUS[0]}
    fi
    printf '{"phase": "%s", "kind": "phase", "rc": %d, "seconds": %d}\n' "$name" "$rc" $(($(date +%s) - begin)) \
        >>"$out/results.jsonl"
}

{
    echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) CPUs, PYTHONPATH=$PYTHONPATH"
    command -v nvidia-smi >/dev/null && nvidia-smi
} 2>&1 | tee -a "$out/env.log"
phase env 60
phase smoke 150
phase core 300
phase peers 600
"$python" benchmarks/first_light.py summary --out "$out" "${tiny[@]}"
