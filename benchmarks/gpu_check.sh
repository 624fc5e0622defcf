#!/usr/bin/env bash
# The GPU check of issue 15, in one go, for a session that is lent a GPU (about 8 minutes on
# one H100-class GPU; run it with a timeout that leaves room for a rerun):
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu-check.log
#
# 1. the CUDA-only tests (CUDA copy engine, the micro-batch probe on a real GPU);
# 2. benchmarks/gpu_throughput.py: convnext_tiny and resnet50 at 224 px, bf16, channels_last,
#    without and with torch.compile; arm (c) is the synthetic-input (pre-made batches) step rate;
#    compare with timm's published training benchmark (RTX 3090, AMP, NHWC: resnet50 1,218
#    img/s, convnext_tiny 819 img/s);
# 3. the micro-batch protocol.micro_batch "auto" finds for both models at 224 and 448 px, for a
#    per-GPU share of 1,024 images (printed by the first benchmark run).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

echo "== CUDA-only tests"
python -m pytest -q -p no:cacheprovider -k cuda tests/test_data_loader.py tests/test_micro_batch.py

echo "== throughput, eager, and the 'auto' micro-batches"
python benchmarks/gpu_throughput.py --images 3000 --rounds 2 --probe-resolutions 224 448 --probe-batch 1024

echo "== throughput, torch.compile"
python benchmarks/gpu_throughput.py --images 3000 --rounds 2 --compile --probe-resolutions
