#!/usr/bin/env bash
# What the device tool's one command runs on the GPU machine: bench/gpu_check.sh, within the
# tool's limits (600 s a command; only files under $OUT come back, at most 8, 16 MiB each,
# and what is there when the limit kills the command still comes back).
#   - gpu_check.sh runs under `timeout` (DEVICE_RUN_TIMEOUT, default 530 s, then SIGTERM: it
#     records the running stage as CUT and prints its summary; SIGKILL 25 s later), so the
#     packing below always runs, well inside 600 s; its own budget (GPU_CHECK_BUDGET, default
#     470 s) normally ends it first;
#   - its whole output is teed into $OUT/device_run.log as it goes (back even if the tool
#     kills this script);
#   - at the end (also after the timeout) its summary, logs and kernels*.json, and the FSDP
#     runs' metrics.jsonl, are packed into $OUT/gpu_check.tgz;
#   - with DEVICE_RUN_CACHE=1 the Triton cache it ends with (the precompiled kernels plus
#     those the GPU compiled, e.g. the pytest stages') is packed and split into <= 15 MiB
#     parts, $OUT/triton_cache.tgz.part-aa, -ab, ... (at most 6); here,
#     `cat triton_cache.tgz.part-* > .triton_cache.tgz` makes it the next call's cache.
# So at most 8 files come back: the log, the archive and up to 6 cache parts.
#
#   bash bench/prepare_gpu_run.sh      # first, on the CPU machine: .fla and .triton_cache.tgz
#   run(command="bash bench/device_run.sh", carry=[".fla", ".triton_cache.tgz"], timeout_s=600)
#   OUT=/tmp/out GPU_CHECK_DRY=1 GPU_CHECK_STAGES="tests*" bash bench/device_run.sh   # a CPU try
#
# Environment: OUT (required: the device tool's output folder), DEVICE_RUN_TIMEOUT (s, default
# 530), DEVICE_RUN_CACHE (1: also the cache parts), and every GPU_CHECK_* / CAP_* setting of
# bench/gpu_check.sh (GPU_CHECK_OUT and GPU_CHECK_WORK default to folders under
# /tmp/device_run here).
set -u
if [ -z "${OUT:-}" ]; then
    echo "error: OUT is not set: run this as the device tool's command, or set OUT to a folder for its files" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
T0=$SECONDS
mkdir -p "$OUT" || { echo "error: cannot create OUT=$OUT" >&2; exit 2; }
LIMIT=${DEVICE_RUN_TIMEOUT:-530}
case $LIMIT in ''|*[!0-9]*) echo "error: DEVICE_RUN_TIMEOUT must be a number of seconds, got '$LIMIT'" >&2; exit 2 ;; esac
BASE=/tmp/device_run
if [ -z "${GPU_CHECK_OUT:-}" ]; then      # ours: emptied first, so the archive holds this run's files only
    export GPU_CHECK_OUT=$BASE/gpu_check
    rm -rf "$GPU_CHECK_OUT"
fi
export GPU_CHECK_WORK=${GPU_CHECK_WORK:-$BASE/work}
mkdir -p "$GPU_CHECK_OUT" "$GPU_CHECK_WORK" || { echo "error: cannot create $GPU_CHECK_OUT or $GPU_CHECK_WORK" >&2; exit 2; }
LOG=$OUT/device_run.log
budget=${GPU_CHECK_BUDGET:-}
if [ -n "$budget" ] && [ "$budget" -gt $((LIMIT - 40)) ] 2>/dev/null; then
    echo "device_run: warning: GPU_CHECK_BUDGET=$budget leaves under 40 s of DEVICE_RUN_TIMEOUT=$LIMIT for start-up: the timeout may cut the last stage" | tee -a "$LOG"
fi
echo "device_run: bash bench/gpu_check.sh under timeout ${LIMIT}s, output teed to $LOG; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee -a "$LOG"

# --kill-after: gpu_check's stop() waits up to 10 s for the running stage, then prints the summary
timeout --kill-after=25 "$LIMIT" bash bench/gpu_check.sh 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
case $rc in 124|137) echo "device_run: gpu_check.sh stopped by the ${LIMIT}s timeout (rc $rc)" | tee -a "$LOG" ;; esac

# the logs, one archive: summary.tsv, logs/, kernels*.json, the FSDP runs' metrics
runs=$(cd "$GPU_CHECK_WORK" 2>/dev/null && find runs -name metrics.jsonl 2>/dev/null)
tar czf "$OUT/gpu_check.tgz" -C "$GPU_CHECK_OUT" . ${runs:+-C "$GPU_CHECK_WORK" $runs} 2>&1 | tee -a "$LOG"

if [ "${DEVICE_RUN_CACHE:-0}" = 1 ]; then
    cache=${TRITON_CACHE_DIR:-$GPU_CHECK_WORK/triton_cache}
    if [ -d "$cache" ]; then
        tar czf "$BASE/triton_cache.tgz" -C "$cache" . &&
            split -b 15M -a 2 "$BASE/triton_cache.tgz" "$OUT/triton_cache.tgz.part-"
        parts=$(find "$OUT" -maxdepth 1 -name 'triton_cache.tgz.part-*' | wc -l)
        if [ "$parts" -gt 6 ]; then
            rm -f "$OUT"/triton_cache.tgz.part-*
            echo "device_run: the packed cache ($(du -h "$BASE/triton_cache.tgz" | cut -f1)) needs $parts parts of 15 MiB: more than the 6 that fit the tool's 8 files; not sent" | tee -a "$LOG"
        else
            echo "device_run: triton cache $(du -h "$BASE/triton_cache.tgz" | cut -f1) in $parts part(s): cat triton_cache.tgz.part-* > .triton_cache.tgz" | tee -a "$LOG"
        fi
    else
        echo "device_run: no Triton cache at $cache to pack" | tee -a "$LOG"
    fi
fi
echo "device_run: $((SECONDS - T0)) s, gpu_check rc $rc; files in \$OUT: $(cd "$OUT" && ls | paste -sd ' ')" | tee -a "$LOG"
exit "$rc"
