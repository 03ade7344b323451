#!/usr/bin/env bash
# The accelerator check (bench/accelerator.py): bf16 training steps of dense_small, moe_tiny and
# mamba_tiny with each attention implementation, MFU against the device's peak and PyTorch on
# the same GPU, as one table; made to take under 8 minutes on one GPU (docs/performance.md).
#
#   bench/accelerator.sh [--dry-run] [--steps N] [--repeats N]
#
#   --dry-run    check the script on CPU: tiny shapes, 1 step, no cuDNN, no torch.compile
#   --steps N    steps per variant per round (default 10)
#   --repeats N  timed rounds after the warm-up round (default 3)
set -euo pipefail
forward=()
while (($#)); do
    case "$1" in
        --dry-run) forward+=("$1") ;;
        --steps|--repeats)
            if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
                echo "error: $1 takes a positive integer, got '${2-}'" >&2
                exit 2
            fi
            forward+=("$1" "$2")
            shift ;;
        -h|--help) sed -n '2,10p' "$0" | cut -c3-; exit 0 ;;
        *) echo "error: unknown argument '$1' (allowed: --dry-run, --steps N, --repeats N)" >&2
           exit 2 ;;
    esac
    shift
done
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # one process per variant: they share the GPU
exec python bench/accelerator.py "${forward[@]}"
