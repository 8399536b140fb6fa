#!/usr/bin/env bash
# GPU-marked tests on the device machine, one pytest step per file so that one slow file
# (autotuning compiles every launch config) cannot hide the others' results.
#
#   bash bench/gpu_tests.sh [-t SECONDS_PER_FILE] FILE...      (repository root; logs to $OUT or /tmp)
#   bash bench/gpu_tests.sh -t 200 tests/passes/test_lower_indexer.py tests/kernels/test_topk_select.py
#
# Wheels carried in .whl/ (newer transformers, pytest) are installed to /tmp/site first.
# Prints one summary line per file; the full log of each file is in $OUT/gpu_<name>.log.
set -uo pipefail
per_file=200
if [[ "${1:-}" == "-t" ]]; then per_file=$2; shift 2; fi
out=${OUT:-/tmp}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
export PYTHONUNBUFFERED=1
for file in "$@"; do
    log="$out/gpu_$(basename "$file" .py).log"
    timeout -s INT "$per_file" python3 -m pytest -m gpu -v -p no:cacheprovider --durations=5 "$file" > "$log" 2>&1
    rc=$?
    summary=$(grep -E "^=+ .* in [0-9.]+s" "$log" | tail -1)
    echo "$file: rc=$rc ${summary:-no summary (cut by the ${per_file}s limit?)}"
    grep -E "^(FAILED|ERROR) " "$log" | head -5
done
