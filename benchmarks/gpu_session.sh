#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in phases, for a session with a short lease on one
# H100/H200. A fresh lease runs benchmarks/first_light.sh first (at most 9 minutes: environment,
# smoke, the core rows at A, Q, L and the peers at A, with every bar); these come after it:
#
#   bash benchmarks/gpu_session.sh check        # GPU tests, compute-sanitizer, sm_90 compile profile, prefops compare on CUDA
#   bash benchmarks/gpu_session.sh core         # bench_core at A, L, Q, every row, full autotune (issue 2)
#   bash benchmarks/gpu_session.sh families     # bench_losses, bench_listwise, bench_tdpo, bench_diagnostics (3, 4, 5)
#   bash benchmarks/gpu_session.sh training     # bench_training throughput, then the longest pair per row (6, 15; <= 8 min)
#   bash benchmarks/gpu_session.sh shared       # bench_shared_prompt (7)
#   bash benchmarks/gpu_session.sh online       # bench_online: rounds of sample, judge, train at the 1B shape (<= 8 min)
#
# Reports go to $OUT (the device tool's output folder) or ./gpu-results. prefops is not
# installed: the checkout goes on PYTHONPATH (prefops/__init__.py maps kernels/ and training/).
# The first phase of a fresh machine installs the peers' wheels fetched beforehand with
# benchmarks/fetch_wheels.sh (carried as .whl) into /tmp/site; later phases on the same
# machine skip it. Copy each report into benchmarks/RESULTS.md with its device line.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

install() {
    if [[ ! -d /tmp/site ]] && compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    export PYTHONPATH=$(pwd):/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

run() {  # name, command...: log to $out/name.log, keep going when one fails
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" | tail -40
}

install
case "${1:-check}" in
    check)
        run gpu-tests python3 -m pytest -q -m gpu tests
        run sanitize bash benchmarks/sanitize.sh
        # The box's own triton (3.6) may allocate registers differently from CI's: log its compile report.
        run hopper-profile python3 tests/compile_for_hopper.py --profile
        run compare-bf16 python3 -m prefops.tools.cli compare --device cuda --dtype bfloat16
        run compare-fp32 python3 -m prefops.tools.cli compare --device cuda --dtype float32 ;;
    core)
        for shape in A L Q; do
            run "core-$shape" python3 benchmarks/bench_core.py --shapes "$shape" --forward-shapes "$shape" \
                --out "$out/core-$shape.md"
        done ;;
    families)
        run losses python3 benchmarks/bench_losses.py --out "$out/losses.md"
        run listwise python3 benchmarks/bench_listwise.py --out "$out/listwise.md"
        run tdpo python3 benchmarks/bench_tdpo.py --out "$out/tdpo.md"
        run diagnostics python3 benchmarks/bench_diagnostics.py --out "$out/diagnostics.md" ;;
    training)
        # At most 8 minutes: every command has a wall-clock cap (timeout) above its rows' --budget plus the
        # imports, and the caps sum to 455 s; a row out of budget reports the longest length that trained so
        # far, and a command past its cap still leaves each try's line in its log.
        run training-throughput timeout 60 python3 benchmarks/bench_training.py --part throughput \
            --rows prefops,naive,trl --reps 3 --warmup 1 --out "$out/training.md"
        run training-longest-naive timeout 90 python3 benchmarks/bench_training.py --part longest --rows naive \
            --budget 60 --out "$out/training-longest-naive.md"
        run training-longest-prefops timeout 85 python3 benchmarks/bench_training.py --part longest --rows prefops \
            --budget 60 --out "$out/training-longest-prefops.md"
        run training-longest-prefops-packed timeout 85 python3 benchmarks/bench_training.py --part longest \
            --rows prefops --attention prefops --layout packed --budget 60 --out "$out/training-longest-packed.md"
        run training-longest-trl timeout 90 python3 benchmarks/bench_training.py --part longest --rows trl \
            --attention prefops --layout packed --budget 60 --out "$out/training-longest-trl.md"
        run training-longest-flash timeout 45 python3 benchmarks/bench_training.py --part longest --rows prefops \
            --attention flash --layout packed --budget 25 --out "$out/training-longest-flash.md" ;;
    shared)
        run shared-prompt python3 benchmarks/bench_shared_prompt.py --out "$out/shared-prompt.md" ;;
    online)
        # At most 8 minutes: the caps sum to 450 s, each over the imports, the 1B model and three rounds
        # (one warm-up); every round prints its line as it ends, so a command past its cap still logs the
        # rounds it finished. First the trainer's default of 64 sequences per generate() call, then the
        # round's 256 sequences in one call.
        run online timeout 270 python3 benchmarks/bench_online.py --out "$out/online.md"
        run online-batch256 timeout 180 python3 benchmarks/bench_online.py --sample-batch 256 \
            --out "$out/online-batch256.md" ;;
    *)
        echo "unknown phase ${1}; choose check, core, families, training, shared or online" >&2
        exit 2 ;;
esac
