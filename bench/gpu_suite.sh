#!/usr/bin/env bash
# One-shot GPU suite (bench/gpu_suite.py): every GPU figure in one command, <= 8 minutes on
# one H200. Writes gpu_suite.json, gpu_suite.md and gpu_suite.log under $OUT (the device
# tool's output folder), else under --out DIR, else bench/out/gpu_suite.
#
#   bash bench/gpu_suite.sh                    # on the GPU machine
#   bash bench/gpu_suite.sh --dry-run          # every part on the CPU, tiny sizes (< 60 s)
#   bash bench/gpu_suite.sh --download-wheels  # here, before: webdataset, braceexpand, PyAV,
#                                              # decord for Python 3.12 into .whl/ (git-ignored)
#
# Other options go to bench/gpu_suite.py (--parts, --budget). PYTHON picks the interpreter
# (default python3). Wheels found in .whl/ are installed into a temporary folder first (the
# GPU machine cannot reach a registry); without them the loader part records why it skipped.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON="${PYTHON:-python3}"
out="${OUT:-bench/out/gpu_suite}"
dry_run=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        --dry-run) dry_run=1; args+=("$1"); shift ;;
        --download-wheels)
            # versions from constraints.txt; binaries for the GPU image's CPython 3.12, x86-64
            mapfile -t pins < <(grep -iE '^(webdataset|braceexpand|av|decord)==' constraints.txt)
            exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 \
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                --platform manylinux2010_x86_64 -d .whl "${pins[@]}" ;;
        *) args+=("$1"); shift ;;
    esac
done
mkdir -p "$out"
log="$out/gpu_suite.log"
: > "$log"
if [ "$dry_run" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
    site="$(mktemp -d /tmp/gpu_suite_site.XXXXXX)"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl >> "$log" 2>&1; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        echo "[gpu_suite.sh] installed $(ls .whl | tr '\n' ' ')into $site" | tee -a "$log"
    else
        echo "[gpu_suite.sh] installing .whl/ failed (see above); parts that need them skip" \
            | tee -a "$log"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" bench/gpu_suite.py --out "$out" "${args[@]}" 2>&1 | tee -a "$log"
