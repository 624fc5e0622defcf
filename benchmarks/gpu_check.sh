#!/usr/bin/env bash
# The GPU check (issue 21): about 6 minutes on one H100, every stage under its own timeout,
# results in $OUT/gpu_check.json (or --out DIR), rewritten after every stage so a cut-off run
# keeps what it measured. Stages and figures: docs/gpu.md, "The GPU check".
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh              # on a GPU
#   bash benchmarks/gpu_check.sh --out /tmp/gpu-check --dry-run  # anywhere: plans, runs nothing
#   bash benchmarks/gpu_check.sh --only resume oom               # some stages (env always runs)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
