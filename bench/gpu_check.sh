#!/usr/bin/env bash
# GPU readiness check: one script, under 8 minutes on one GPU, that proves the CUDA paths and measures them; writes
# report.json, report.md and steps.log (README: "GPU"). On a CPU, --dry-run runs every step at tiny size.
#
#   bash bench/gpu_check.sh [--dry-run] [--out DIR] [--wheels DIR] [--calvin_env DIR] [--reference_dir DIR]
#                           [--lmdb PATH] [--only step,step] [--keep_work]
#
# --wheels DIR (or $GR1_WHEELS, else bench/wheels/ or .whl/ when present): wheels installed with pip --no-index
#   --no-deps into a folder put on PYTHONPATH (nothing in site-packages changes; torch, nvidia-* and triton wheels
#   are never installed: the machine's CUDA torch stays).
# --calvin_env DIR: a calvin_env git clone, put on PYTHONPATH (what `pip install -e` would do; its dependencies come
#   with --wheels).
# Fixtures and mini_calvin: the tests and the data step read ../shared, or $GR1_SHARED where it is carried elsewhere.
# Everything else goes to bench/gpu_check.py (--out, --dry-run, --reference_dir, --lmdb, --only, --keep_work).
set -uo pipefail

STARTED=$(date +%s)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON=python; elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
    else PYTHON=python3; fi
fi
WHEELS="${GR1_WHEELS:-}"
CALVIN_ENV=""
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --calvin_env) CALVIN_ENV="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done
if [ -z "$WHEELS" ]; then
    for dir in bench/wheels .whl; do [ -d "$dir" ] && WHEELS="$dir" && break; done
fi

SETUP_LOG="$(mktemp)"
trap 'rm -f "$SETUP_LOG"' EXIT
note() { echo "$*" | tee -a "$SETUP_LOG"; }

if [ -n "$WHEELS" ]; then
    SITE="${TMPDIR:-/tmp}/gr1_gpu_check_site"
    mapfile -t FILES < <(find "$WHEELS" -maxdepth 1 -name '*.whl' | grep -v -E '/(torch-|nvidia_|triton-)[^/]*$' | sort)
    if [ ${#FILES[@]} -eq 0 ]; then
        note "wheels: none in $WHEELS"
    elif "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${FILES[@]}" >"$SITE.log" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        note "wheels: ${#FILES[@]} from $WHEELS installed into $SITE (on PYTHONPATH)"
    else
        note "wheels: pip install from $WHEELS failed: $(tail -n 1 "$SITE.log")"
    fi
fi
if [ -n "$CALVIN_ENV" ]; then
    if [ -d "$CALVIN_ENV/calvin_env" ]; then
        export PYTHONPATH="$(cd "$CALVIN_ENV" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
        note "calvin_env: clone $CALVIN_ENV on PYTHONPATH"
    else
        note "calvin_env: $CALVIN_ENV is not a calvin_env clone (no calvin_env/ package folder)"
    fi
fi
note "python: $("$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1 | tail -n 1)"

"$PYTHON" bench/gpu_check.py --started "$STARTED" --setup_log "$SETUP_LOG" ${PASS[@]+"${PASS[@]}"}
