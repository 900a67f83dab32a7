#!/usr/bin/env bash
# One job on a GPU machine: build fastkd with its CUDA kernels, run the GPU tests, and benchmark
# the KD loss and the feature losses on the GPU against PyTorch eager, torch.compile (default and
# max-autotune) and Liger-Kernel, then derive the backend tables of backend="auto". Run from
# anywhere inside the repository, with OUT set to an empty output folder:
#
#   OUT=/tmp/out FASTKD_COMMIT=$(git rev-parse HEAD) scripts/gpu_job.sh
#
# The machine needs no internet: torch, triton, nvcc, pytest, pytest-benchmark and matplotlib are
# expected to be installed. Wheels in .whl/ (e.g. .whl/liger_kernel-*.whl) are installed into /tmp
# with --no-deps first; Liger-Kernel is benchmarked when it imports.
#
# Time: everything must end within GPU_JOB_BUDGET_S seconds (default 530, under nine minutes).
# Each phase runs under `timeout` with the smaller of its own cap and the time left (less a
# reserve for the final report); a benchmark phase also gets `--budget` a little below its limit,
# so it stops starting new cases and saves its results itself. Phases, most important first:
#   env (~5 s) | build (cap 240 s; a failed CUDA build is retried without CUDA so the Triton
#   backend can still be measured) | wheels (cap 30 s) | tests (cap 90 s) | bench kd: plain and
#   CE-mixed KD, fastkd vs eager vs Liger (cap 110 s) | bench features: channel attention over
#   ResNet-50's stages at B=256 and feature regression on large maps, vs eager (cap 80 s) | bench
#   compile: torch.compile default mode on a subset (cap 80 s) | bench guided + 3-teacher cohort
#   (cap 60 s) | bench max-autotune on a smaller subset (cap 50 s) | tune + report (the rest).
# GPU_JOB_PARTS (default "kd features compile extra autotune") picks the benchmark phases, so a
# second call on a still-warm machine (the build is then incremental) can run the rest.
# A phase that fails or times out is reported in summary.txt and the job goes on; the exit status
# is 0 only when every phase that ran succeeded.
#
# Output (7 files, flat): summary.txt (one line per phase), gpu_job.log (machine, versions, date,
# commit, build output, progress), tests.log, bench.json (every measurement, all phases),
# bench.txt (the tables), bench.png (GB/s per case against the copy bandwidth), tuning.tar (the
# fastkd/tuning/*.json tables `python -m fastkd tune` derived from bench.json).
#
# GPU_JOB_DRY_RUN=1 runs the same phases on the CPU with tiny shapes and without the build (for
# checking the script itself on a machine without a GPU; PYTHON selects the interpreter).

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"

PY=${PYTHON:-python3}
TOTAL=${GPU_JOB_BUDGET_S:-530}
RESERVE=20
DRY=${GPU_JOB_DRY_RUN:-0}
START=$SECONDS
LOG=$OUT/gpu_job.log
SUMMARY=$OUT/summary.txt
PARTS=" ${GPU_JOB_PARTS:-kd features compile extra autotune} "
JSON=$OUT/bench.json
TABLE=$OUT/bench.txt
PNG=$OUT/bench.png
FAILED=()
export PYTHONUNBUFFERED=1
: >"$SUMMARY"

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# phase NAME CAP_S STDOUT_FILE STDERR_FILE COMMAND...
# Runs COMMAND under a time limit of min(CAP_S, time left - RESERVE); records the outcome.
phase() {
    local name=$1 cap=$2 out=$3 err=$4
    shift 4
    local limit=$((TOTAL - (SECONDS - START) - RESERVE))
    ((cap < limit)) && limit=$cap
    if ((limit < 10)); then
        log "SKIP $name: no time left"
        printf '%-24s skipped: no time left\n' "$name" >>"$SUMMARY"
        return 124
    fi
    log "START $name (limit ${limit}s)"
    local t0=$SECONDS rc status
    timeout --kill-after=10 "$limit" "$@" >>"$out" 2>>"$err"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    ((rc == 0)) || FAILED+=("$name")
    log "END $name: $status ($((SECONDS - t0))s)"
    printf '%-24s %s (%ss)\n' "$name" "$status" "$((SECONDS - t0))" >>"$SUMMARY"
    return $rc
}

# bench NAME CAP_S ARGS...: one `python -m fastkd bench` phase adding to the shared JSON.
bench() {
    local name=$1 cap=$2
    shift 2
    local limit=$((TOTAL - (SECONDS - START) - RESERVE))
    ((cap < limit)) && limit=$cap
    local budget=$((limit - 30))
    ((budget < 10)) && budget=10
    echo "== $name ==" >>"$TABLE"
    phase "$name" "$cap" "$TABLE" "$LOG" "$PY" -P -m fastkd bench "${COMMON[@]}" \
        --budget "$budget" "$@"
}

if [[ $DRY == 1 ]]; then
    CORE_SHAPES=(16x100 32x1000)
    COMPILE_SHAPES=(16x100)
    AUTOTUNE_SHAPES=(16x100)
    STAGE_SHAPES=(4x16x16x16)
    MAP_SHAPES=(4x32x16x16)
    COMMON=(--device cpu --quick --threads 1 --json "$JSON" --append --backend torch)
else
    # The GPU issue's KD shapes: C in {100, 1000, 32000, 128256, 262144} at 8192 rows, and 65536
    # rows for C=1000 (ImageNet-sized batches of a large data-parallel job).
    CORE_SHAPES=(8192x100 8192x1000 65536x1000 8192x32000 8192x128256 8192x262144)
    COMPILE_SHAPES=(8192x1000 8192x32000 8192x128256)
    AUTOTUNE_SHAPES=(8192x32000 8192x128256)
    # ResNet-50's four stages at B=256 ([256, 256, 56, 56] ... [256, 2048, 7, 7]); large maps.
    STAGE_SHAPES=(256x256x56x56)
    MAP_SHAPES=(64x256x56x56 256x256x56x56)
    COMMON=(--device cuda --rep-ms 50 --warmup-ms 10 --json "$JSON" --append
        --backend cuda triton)
fi

# --- env -------------------------------------------------------------------------------------
COMMIT=${FASTKD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export FASTKD_COMMIT=$COMMIT
{
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit:  $COMMIT"
    echo "host:    $(uname -a)"
    echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "budget:  ${TOTAL}s; dry run: $DRY"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
            --format=csv 2>&1
    fi
    if command -v nvcc >/dev/null; then nvcc --version 2>&1 | tail -n 2; fi
    "$PY" - <<'EOF' 2>&1
import platform, sys
import torch
print("python: ", sys.version.split()[0], platform.platform())
print("torch:  ", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton: ", triton.__version__)
except ImportError as e:
    print("triton:  not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:    ", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB",
          f"{p.multi_processor_count} SMs", f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("gpu:     none visible")
EOF
} >>"$LOG"
log "environment logged"
printf '%-24s ok\n' env >>"$SUMMARY"

# --- build -----------------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
    log "dry run: build skipped (using the installed fastkd)"
else
    if [[ -z ${FASTKD_CUDA_ARCHS:-} ]]; then
        # Only this GPU's architecture: a single SASS target halves nvcc's work. Hopper gets 90a.
        arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" \
            2>/dev/null || echo 90)
        [[ $arch == 90 ]] && arch=90a
        export FASTKD_CUDA_ARCHS=$arch
    fi
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    log "building with FASTKD_CUDA_ARCHS=$FASTKD_CUDA_ARCHS MAX_JOBS=$MAX_JOBS"
    if ! FASTKD_BUILD_CUDA=1 phase build 240 "$LOG" "$LOG" \
        "$PY" -m pip install --no-deps --no-build-isolation -e .; then
        log "the CUDA build failed; building without CUDA so the Triton backend can be measured"
        FASTKD_BUILD_CUDA=0 phase build-without-cuda 150 "$LOG" "$LOG" \
            "$PY" -m pip install --no-deps --no-build-isolation -e .
    fi
fi
"$PY" -P -c "
import fastkd.backends as b
print('fastkd: extension loaded, with CUDA, reason:', b.EXTENSION_LOADED, b.EXTENSION_WITH_CUDA, b.EXTENSION_REASON)
print('fastkd: triton:', b.triton_status() or 'available')
" >>"$LOG" 2>&1 || log "fastkd does not import; the benchmarks will fail"

# --- wheels: Liger-Kernel (and anything else a test needs) carried in .whl/ --------------------
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
PEERS=(eager)
if ((${#wheels[@]})); then
    if phase wheels 30 "$LOG" "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/fastkd-site "${wheels[@]}"; then
        export PYTHONPATH=/tmp/fastkd-site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
if "$PY" -c "from liger_kernel.transformers import LigerKLDIVLoss" >>"$LOG" 2>&1; then
    log "Liger-Kernel imports: it is benchmarked (its version is in the JSON)"
    PEERS+=(liger)
else
    log "Liger-Kernel is not importable (no .whl/liger_kernel-*.whl?): it is not benchmarked"
    printf '%-24s skipped: not importable\n' liger >>"$SUMMARY"
fi

# --- tests -----------------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
    TESTS="'$PY' -P -m pytest -q -p no:cacheprovider tests/test_bench.py"
else
    # The tests marked cuda, then the Triton and CUDA backend tests that carry no marker.
    # pytest's exit 5 (nothing selected) is not a failure here.
    TESTS="'$PY' -P -m pytest -q -p no:cacheprovider -m cuda tests; a=\$?; \
'$PY' -P -m pytest -q -p no:cacheprovider -m 'not cuda' -k 'triton or cuda' tests; b=\$?; \
for r in \$a \$b; do [ \$r = 0 ] || [ \$r = 5 ] || exit \$r; done"
fi
phase tests 90 "$OUT/tests.log" "$OUT/tests.log" bash -c "$TESTS"

# --- benchmarks ------------------------------------------------------------------------------
part() { [[ $PARTS == *" $1 "* ]]; }
if part kd; then
    bench bench-kd 110 --loss kd_loss --shapes "${CORE_SHAPES[@]}" --dtype bf16 fp32 \
        --variants plain ce --mode fwd fwdbwd --peers "${PEERS[@]}"
fi
if part features; then
    bench bench-features 80 --loss channel_attention --shapes "${STAGE_SHAPES[@]}" \
        --dtype bf16 fp32 --variants stages-cl stages --mode fwd fwdbwd --peers eager
    bench bench-features-reg 60 --loss feature_regression --shapes "${MAP_SHAPES[@]}" \
        --dtype bf16 fp32 --variants mse mse-cl feed feed-cl --mode fwd fwdbwd --peers eager
fi
if part compile; then
    bench bench-compile 80 --loss kd_loss --shapes "${COMPILE_SHAPES[@]}" --dtype bf16 \
        --variants plain ce --mode fwd fwdbwd --peers compile
    bench bench-compile-features 50 --loss channel_attention feature_regression \
        --shapes "${STAGE_SHAPES[@]}" --dtype bf16 --variants stages-cl mse-cl feed-cl \
        --mode fwdbwd --peers compile
fi
if part extra; then
    bench bench-guided-cohort 60 --loss kd_loss --shapes "${CORE_SHAPES[@]}" --dtype bf16 fp32 \
        --variants guided cohort3 --mode fwd fwdbwd --peers "${PEERS[@]}"
fi
if part autotune; then
    bench bench-max-autotune 50 --loss kd_loss --shapes "${AUTOTUNE_SHAPES[@]}" --dtype bf16 \
        --variants plain --mode fwdbwd --peers compile-max-autotune
fi

# --- tuning tables for backend="auto" ----------------------------------------------------------
if [[ -f $JSON && $DRY == 0 ]]; then
    TUNED=/tmp/fastkd-tuning
    rm -rf "$TUNED"
    if phase tune 30 "$LOG" "$LOG" "$PY" -P -m fastkd tune "$JSON" --out "$TUNED/tuning"; then
        tar -C "$TUNED" -cf "$OUT/tuning.tar" tuning
    fi
fi

# --- report ----------------------------------------------------------------------------------
RESERVE=0
if [[ -f $JSON ]]; then
    echo "== all phases ==" >>"$TABLE"
    phase report 60 "$TABLE" "$LOG" "$PY" -P -m fastkd report "$JSON" --plot "$PNG"
else
    log "no benchmark results to report"
    printf '%-24s skipped: no results\n' report >>"$SUMMARY"
fi
log "done in $((SECONDS - START))s; failed or timed out: ${FAILED[*]:-none}"
tee -a "$LOG" <"$SUMMARY"
((${#FAILED[@]} == 0))
