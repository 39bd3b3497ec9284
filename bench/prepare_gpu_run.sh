#!/usr/bin/env bash
# Prepare, on this machine (no GPU needed), what a GPU session's one device call carries: the
# device machine starts from a fresh checkout without network, so nothing gitignored survives
# between sessions. Run it before the first device call of a session (it is idempotent: a
# second run reuses what is there):
#   (a) fla in .fla/site (bash bench/fetch_fla.sh), for gpu_check's fla stages, if absent;
#   (b) Triton 3.6.0, the GPU image's release, in /tmp/t36site (pip install --no-deps --target),
#       and its cp312 wheel in /tmp/whl (the image runs Python 3.12), if absent;
#   (c) bench/precompile.py against them: the Triton kernels of gpu_check's step and
#       kernel-bench stages compiled for sm_90 into .triton_cache.tgz (without it a GPU check
#       spends its 10 minutes compiling); skipped when the cache exists and what it was
#       compiled from (kernels/, bench/ and the top-level *.py, configs/, gpu_check's stage
#       commands, the wheel) has not changed since;
#   (d) the sizes of what the call carries, and the device call to make next.
#
#   bash bench/prepare_gpu_run.sh            # ~10-20 min for a cold cache on 2 busy cores
#   PREPARE_FORCE=1 bash bench/prepare_gpu_run.sh    # recompile even if the sources match
#
# Environment: PYTHON (default .venv/bin/python if present, else python3), T36_SITE (default
# /tmp/t36site), T36_WHEELS (default /tmp/whl), PREPARE_STAMP (default /tmp/prepare_gpu_run.stamp:
# which sources the cache was compiled from), PREPARE_FORCE (1: recompile). Errors are one line
# on stderr (exit 1); the logs of the steps that failed are named in it.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
TRITON_VERSION=3.6.0
SITE=${T36_SITE:-/tmp/t36site}
WHEELS=${T36_WHEELS:-/tmp/whl}
STAMP=${PREPARE_STAMP:-/tmp/prepare_gpu_run.stamp}
LOGS=$(mktemp -d /tmp/prepare_gpu_run.XXXXXX)
START=$SECONDS
die() { echo "prepare_gpu_run: error: $*" >&2; exit 1; }
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# (a) fla
if [ -d .fla/site/fla ]; then
    echo "fla: .fla/site present"
else
    bash bench/fetch_fla.sh > "$LOGS/fetch_fla.log" 2>&1 ||
        die "bash bench/fetch_fla.sh failed ($(tail -n 1 "$LOGS/fetch_fla.log"); log $LOGS/fetch_fla.log)"
    echo "fla: $(tail -n 1 "$LOGS/fetch_fla.log")"
fi

# (b) Triton 3.6.0 for this Python, and the GPU's cp312 wheel (whose libtriton.so keys the cache)
if [ -f "$SITE/triton/__init__.py" ] && [ -d "$SITE/triton-$TRITON_VERSION.dist-info" ]; then
    echo "triton $TRITON_VERSION: $SITE present"
else
    "$PY" -m pip install --quiet --no-deps --target "$SITE" "triton==$TRITON_VERSION" > "$LOGS/pip_install.log" 2>&1 ||
        die "pip install --target $SITE triton==$TRITON_VERSION failed ($(grep -m 1 -i error "$LOGS/pip_install.log"); log $LOGS/pip_install.log)"
    echo "triton $TRITON_VERSION: installed in $SITE"
fi
wheel() { compgen -G "$WHEELS/triton-$TRITON_VERSION-cp312-*.whl" | head -n 1; }
if [ -z "$(wheel)" ]; then
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d "$WHEELS" \
        "triton==$TRITON_VERSION" > "$LOGS/pip_download.log" 2>&1 ||
        die "pip download triton==$TRITON_VERSION (cp312) failed ($(grep -m 1 -i error "$LOGS/pip_download.log"); log $LOGS/pip_download.log)"
fi
WHEEL=$(wheel)
[ -n "$WHEEL" ] || die "no triton-$TRITON_VERSION-cp312 wheel in $WHEELS after pip download"
echo "triton $TRITON_VERSION wheel: $WHEEL"

# (c) the precompiled cache. What it holds depends on the kernels' and models' sources, the
# bench scripts and configs the stages run, and gpu_check's stage commands (its listing, which
# bench/precompile.py reads): a stamp of those says whether an existing cache is current.
sources_stamp() {
    { git ls-files -co --exclude-standard -- 'kernels/*.py' 'bench/*.py' 'configs/*.yaml' ':(glob)*.py' 2>/dev/null ||
      find kernels bench configs . -maxdepth 1 \( -name '*.py' -o -name '*.yaml' \) -print; } |
        LC_ALL=C sort -u | xargs -d '\n' sha256sum | sha256sum | cut -c1-16
    GPU_CHECK_LIST=1 bash bench/gpu_check.sh | sed -E 's/--json [^ ]+//g' | sha256sum | cut -c1-16
    echo "triton $TRITON_VERSION $(basename "$WHEEL")"
}
want=$(sources_stamp | paste -sd ' ')
if [ "${PREPARE_FORCE:-0}" != 1 ] && [ -f .triton_cache.tgz ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "triton cache: .triton_cache.tgz is current (sources unchanged since it was compiled)"
else
    echo "triton cache: compiling gpu_check's kernels for sm_90 (bench/precompile.py; log $LOGS/precompile.log)"
    t0=$SECONDS
    # unset TRITON_INTERPRET: the interpreter compiles nothing
    env -u TRITON_INTERPRET -u TRITON_CACHE_DIR PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
        "$PY" bench/precompile.py --target-wheel "$WHEEL" > "$LOGS/precompile.log" 2>&1
    rc=$?
    grep -E '^(triton cache|[a-z_0-9]+: (done|FAILED|skipped))' "$LOGS/precompile.log" | sed 's/^/  /'
    [ -f .triton_cache.tgz ] || die "bench/precompile.py wrote no .triton_cache.tgz (rc $rc; log $LOGS/precompile.log)"
    if [ "$rc" != 0 ]; then
        # a stage that failed leaves its kernels to compile on the GPU; the rest is packed
        echo "prepare_gpu_run: warning: bench/precompile.py rc $rc (a stage failed: see $LOGS/precompile.log); the cache holds the other stages' kernels" >&2
        rm -f "$STAMP"
    else
        echo "$want" > "$STAMP"
    fi
    echo "triton cache: compiled in $((SECONDS - t0)) s"
fi

# (d) sizes and the next call
kernels=$(tar tzf .triton_cache.tgz 2>/dev/null | grep -c '/__grp__.*\.json$')
size() { du -sb "$1" | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
tree=$( (git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1) || echo 0)
fla=$(size .fla); cache=$(size .triton_cache.tgz)
echo "carry: .fla $(mib "$fla"), .triton_cache.tgz $(mib "$cache") ($kernels kernels); with the working tree ($(mib "$tree")) $(mib $((fla + cache + tree))) of the tool's 64 MiB"
[ $((fla + cache)) -le $((64 * 1048576)) ] || die "the carried paths exceed the device tool's 64 MiB"
echo "prepared in $((SECONDS - START)) s. Next, the device call (then give_back, unless rerunning at once):"
echo '  run(command="bash bench/device_run.sh", carry=[".fla", ".triton_cache.tgz"], timeout_s=600)'
rm -rf "$LOGS/fetch_fla.log" "$LOGS/pip_install.log" "$LOGS/pip_download.log"
