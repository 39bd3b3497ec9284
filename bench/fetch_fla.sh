#!/usr/bin/env bash
# Put fla (fla-core, pure Python + Triton) and its one dependency einops in .fla/site, for the
# "vs fla" column of bench/kernels.py (issue 5: Triton delta_rule fwd+bwd <= 1.0x fla's
# chunk_gated_delta_rule). The GPU machine has no network and its image has no fla, so run this
# where the package index is reachable and send .fla with the checkout (the device tool's
# `carry: [".fla"]`); bench/gpu_check.sh puts .fla/site on PYTHONPATH for its fla stage when it
# exists. Nothing is installed into any environment: the wheels are only unpacked.
#
#   bash bench/fetch_fla.sh          # about 6 MB; FLA_VERSION / EINOPS_VERSION pick the versions
set -euo pipefail
cd "$(dirname "$0")/.."
FLA_VERSION=${FLA_VERSION:-0.6.0}        # needs torch >= 2.7, triton >= 3.3
EINOPS_VERSION=${EINOPS_VERSION:-0.8.2}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels" .fla/site.tmp' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
    "fla-core==$FLA_VERSION" "einops==$EINOPS_VERSION"
rm -rf .fla/site.tmp && mkdir -p .fla/site.tmp
for whl in "$wheels"/*.whl; do "$PY" -m zipfile -e "$whl" .fla/site.tmp; done
rm -rf .fla/site && mv .fla/site.tmp .fla/site        # a failed fetch leaves the old copy
PYTHONPATH=.fla/site "$PY" -c "import fla, einops; print('fla', fla.__version__, 'einops', einops.__version__, 'in .fla/site')" 2>/dev/null ||
    echo ".fla/site: fla $FLA_VERSION unpacked (it imports only where torch and triton do)"
