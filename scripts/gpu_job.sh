#!/usr/bin/env bash
# One job on a GPU machine, in one command of at most 8 minutes: build fastkd for this GPU only,
# run the GPU tests (KD first, then the feature losses), then the headline benchmarks against
# PyTorch eager, torch.compile and Liger-Kernel, and write the results under $OUT. Run it from
# anywhere inside the repository, with OUT set to an empty output folder:
#
#   OUT=/tmp/out scripts/gpu_job.sh                        # the headline job (default plan)
#   OUT=/tmp/out GPU_JOB_PLAN=sweep scripts/gpu_job.sh     # optional second call: broad sweeps,
#                                                          # max-autotune, backend tuning tables
#   OUT=/tmp/out GPU_JOB_PLAN=lm scripts/gpu_job.sh        # language models and the teacher
#                                                          # store (see the lm plan below)
#
# The machine needs no internet: torch, triton, nvcc, pytest, pytest-benchmark, hypothesis and
# matplotlib must be installed. Untracked files that must travel with the tree: .whl/*.whl, the
# wheels of anything the machine lacks (Liger-Kernel: `pip download --no-deps liger-kernel`), which
# are installed into /tmp with --no-deps first; Liger-Kernel is benchmarked when it imports.
#
# Time: everything ends within GPU_JOB_BUDGET_S seconds (default 470). Each phase runs under
# `timeout` with the smaller of its own cap and the time left (less a reserve for the report); a
# benchmark phase also gets `--budget` below its limit, so it stops starting new cases and saves
# its results itself. Headline phases, most important first, with their caps:
#   env (~5 s) | build (150 s: one SASS target, MAX_JOBS = all cores; a failed CUDA build is
#   retried without CUDA so the Triton backend can still be tested) | wheels (20 s) |
#   tests-kd (130 s: KD on the CUDA and Triton backends against the float64 reference, stopping
#   at the first failure) | tests-features (60 s: feature regression, channel attention) |
#   bench-kd (100 s: KD [256, 1000], [8192, 32000], [4096, 131072], bf16 and fp32, plain and CE,
#   vs eager and Liger) | bench-kd-compile (60 s: the same vs torch.compile, bf16) |
#   bench-kd-variants (30 s: guided and a 3-teacher cohort at [8192, 32000]) | bench-features
#   (50 s: channel attention over ResNet-50's stages at B=256 bf16 channels_last, MSE and
#   normalised L1 on [64, 256, 56, 56], vs eager and compile) | report (the rest).
# A phase that fails or times out is reported in summary.txt and the job goes on; the exit status
# is 0 only when every phase that ran succeeded.
#
# The lm plan: tests-div (100 s: reverse KL and JSD on both GPU backends, and sparse teachers) | tests-head (40 s:
# linear_kd_loss on both GPU backends) | bench-div (90 s: reverse KL and JSD(0.5) at [8192, 128256] bf16 vs
# eager TRL and LigerJSD) | bench-div-compile (60 s: the same vs torch.compile) | bench-head (100 s:
# linear_kd_loss at 8192 tokens, H=4096, C=128256 bf16 vs eager, compile and Liger's fused linear
# JSD, with peak memory) | bench-store (90 s: ResNet-34 -> ResNet-18 steps, scratch / live-teacher
# kd / kd from a teacher store, synthetic 224 px, batch 256, bf16, channels_last; store.tar).
#
# Output (at most 7 files, flat): summary.txt (one line per phase), gpu_job.log (machine,
# versions, date, commit, build output, progress), tests.log, bench.json (every measurement),
# bench.txt (the tables), bench.png (GB/s per case against the copy bandwidth), and with
# GPU_JOB_PLAN=sweep tuning.tar (the tables `python -m fastkd tune` derives from bench.json).
#
# GPU_JOB_DRY_RUN=1 runs the same phases on the CPU with tiny shapes, eager peers only and
# without the build (CI runs it, so the script cannot rot; PYTHON selects the interpreter).

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"

PY=${PYTHON:-python3}
TOTAL=${GPU_JOB_BUDGET_S:-470}
RESERVE=20
DRY=${GPU_JOB_DRY_RUN:-0}
START=$SECONDS
LOG=$OUT/gpu_job.log
SUMMARY=$OUT/summary.txt
PLAN=${GPU_JOB_PLAN:-headline}
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
    KD_SHAPES=(16x100 8x1000)
    KD_ONE_SHAPE=(8x1000)
    SWEEP_SHAPES=(16x100)
    STAGE_SHAPES=(4x16x16x16)
    MAP_SHAPES=(4x32x16x16)
    COMMON=(--device cpu --quick --threads 1 --json "$JSON" --append --backend torch)
    COMPILE_PEER=eager # torch.compile on the CPU would take minutes for nothing the GPU needs
    LM_SHAPES=(8x300)
    HEAD_SHAPES=(16x8x300)
    STORE_ARGS=(--device cpu --image-size 32 --batch-size 4 --images 8 --crops 1 --warmup 0
        --steps 1 --threads 1)
else
    KD_SHAPES=(256x1000 8192x32000 4096x131072)
    KD_ONE_SHAPE=(8192x32000)
    # The broad sweep: C in {100, 1000, 32000, 128256, 262144}, and 65536 rows at C=1000.
    SWEEP_SHAPES=(8192x100 8192x1000 65536x1000 8192x32000 8192x128256 8192x262144)
    # ResNet-50's four stages at B=256 ([256, 256, 56, 56] ... [256, 2048, 7, 7]); a large map.
    STAGE_SHAPES=(256x256x56x56)
    MAP_SHAPES=(64x256x56x56)
    COMMON=(--device cuda --rep-ms 50 --warmup-ms 10 --json "$JSON" --append
        --backend cuda triton)
    COMPILE_PEER=compile
    LM_SHAPES=(8192x128256)
    HEAD_SHAPES=(8192x4096x128256)
    STORE_ARGS=(--device cuda --image-size 224 --batch-size 256 --images 2048 --crops 2
        --warmup 3 --steps 10 --amp bf16 --channels-last)
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
if "$PY" -P -c "
import fastkd.backends as b
print('fastkd: extension with CUDA kernels:', b.EXTENSION_WITH_CUDA)
print('fastkd: triton:', b.triton_status() or 'available')
" >>"$LOG" 2>&1; then
    printf '%-24s ok\n' import >>"$SUMMARY"
else
    log "fastkd does not import; the tests and benchmarks will fail"
    printf '%-24s failed\n' import >>"$SUMMARY"
    FAILED+=(import)
fi

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

# --- tests: KD first (both GPU backends against the float64 reference), then the feature losses --
# -x stops a phase at its first failure; pytest's exit 5 (nothing selected) is not a failure.
pytest_phase() {
    local name=$1 cap=$2
    shift 2
    phase "$name" "$cap" "$OUT/tests.log" "$OUT/tests.log" bash -c \
        '"$0" -P -m pytest -x -q -p no:cacheprovider "$@"; r=$?; [ $r = 5 ] && r=0; exit $r' \
        "$PY" "$@"
}
if [[ $PLAN == headline ]]; then
    pytest_phase tests-kd 130 -m cuda tests/test_kd_loss_cuda.py
    pytest_phase tests-features 60 -m cuda tests/test_feature_regression.py \
        tests/test_channel_attention.py
elif [[ $PLAN == lm ]]; then
    pytest_phase tests-div 100 -m cuda tests/test_kd_loss_cuda.py tests/test_kd_loss_sparse.py \
        -k "divergence or TestGPU"
    pytest_phase tests-head 40 -m cuda tests/test_linear_kd_loss.py
fi

# --- benchmarks ------------------------------------------------------------------------------
if [[ $PLAN == headline ]]; then
    bench bench-kd 100 --loss kd_loss --shapes "${KD_SHAPES[@]}" --dtype bf16 fp32 \
        --variants plain ce --mode fwdbwd fwd --peers "${PEERS[@]}"
    bench bench-kd-compile 60 --loss kd_loss --shapes "${KD_SHAPES[@]}" --dtype bf16 \
        --variants plain ce --mode fwdbwd --peers "$COMPILE_PEER"
    bench bench-kd-variants 30 --loss kd_loss --shapes "${KD_ONE_SHAPE[@]}" --dtype bf16 \
        --variants guided cohort3 --mode fwdbwd --peers "${PEERS[@]}"
    bench bench-features 50 --loss channel_attention feature_regression \
        --shapes "${STAGE_SHAPES[@]}" "${MAP_SHAPES[@]}" --dtype bf16 \
        --variants stages-cl mse feed --mode fwdbwd --peers eager "$COMPILE_PEER"
elif [[ $PLAN == lm ]]; then
    bench bench-div 90 --loss kd_loss --shapes "${LM_SHAPES[@]}" --dtype bf16 \
        --variants reverse jsd --mode fwdbwd fwd --peers "${PEERS[@]}"
    bench bench-div-compile 60 --loss kd_loss --shapes "${LM_SHAPES[@]}" --dtype bf16 \
        --variants reverse jsd --mode fwdbwd --peers "$COMPILE_PEER"
    HEAD_PEERS=("${PEERS[@]}")
    [[ $COMPILE_PEER == compile ]] && HEAD_PEERS+=(compile)
    bench bench-head 100 --loss linear_kd_loss --shapes "${HEAD_SHAPES[@]}" --dtype bf16 \
        --mode fwdbwd --peers "${HEAD_PEERS[@]}"
    STORE_OUT=/tmp/fastkd-store-bench
    rm -rf "$STORE_OUT"
    if phase bench-store 90 "$LOG" "$LOG" "$PY" -P bench/bench_teacher_store.py \
        --out "$STORE_OUT" "${STORE_ARGS[@]}"; then
        tar -C "$(dirname "$STORE_OUT")" -cf "$OUT/store.tar" "$(basename "$STORE_OUT")"
    fi
elif [[ $PLAN == sweep ]]; then
    bench bench-sweep 200 --loss kd_loss --shapes "${SWEEP_SHAPES[@]}" --dtype bf16 fp32 \
        --variants plain ce guided cohort3 --mode fwd fwdbwd --peers "${PEERS[@]}"
    bench bench-sweep-features 80 --loss channel_attention feature_regression \
        --shapes "${STAGE_SHAPES[@]}" "${MAP_SHAPES[@]}" --dtype bf16 fp32 \
        --variants stages stages-cl mse mse-cl feed feed-cl --mode fwd fwdbwd --peers eager
    if [[ $DRY == 0 ]]; then
        bench bench-max-autotune 60 --loss kd_loss --shapes "${KD_ONE_SHAPE[@]}" --dtype bf16 \
            --variants plain --mode fwdbwd --peers compile-max-autotune
    fi
    if [[ -f $JSON ]]; then
        TUNED=/tmp/fastkd-tuning
        rm -rf "$TUNED"
        if phase tune 30 "$LOG" "$LOG" "$PY" -P -m fastkd tune "$JSON" --out "$TUNED/tuning"; then
            tar -C "$TUNED" -cf "$OUT/tuning.tar" tuning
        fi
    fi
else
    log "GPU_JOB_PLAN must be headline, sweep or lm, got $PLAN"
    exit 2
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
