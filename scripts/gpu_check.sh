#!/usr/bin/env bash
# GPU acceptance check: one command inside the GPU image, on one GPU, in a few minutes.
#
#   bash scripts/gpu_check.sh                     # every check
#   bash scripts/gpu_check.sh --quick --json gpu-check.json
#
# Runs benchmarks/gpu_check.py (its --help lists the options): configs/270m.yaml shrunk through
# both TST phases with the transformer-engine and local specs, the Triton fused linear + MCE
# against the chunked path and one plain cross-entropy, the phase-1 data-token throughput and
# MFU, and FP8 where the GPU has it. Prints a table (PASS / FAIL / SKIP with the reason) and
# exits 1 when a check fails. Without a GPU it runs what a CPU can and SKIPs the rest.
# Environment: MEGATRON_TST_PYTHON (python with megatron-tst installed, default python3).
set -euo pipefail

repo=$(cd -P -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")/.." && pwd)
python=${MEGATRON_TST_PYTHON:-python3}
if ! "$python" -c "import megatron_tst" 2>/dev/null; then
    echo "gpu_check.sh: $python cannot import megatron_tst: install the project" \
        "(pip install -e .) or set MEGATRON_TST_PYTHON to the interpreter that has it" >&2
    exit 2
fi
exec "$python" "$repo/benchmarks/gpu_check.py" "$@"
