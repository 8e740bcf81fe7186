#!/usr/bin/env bash
# GPU benchmarks in one go (for a lent GPU machine; about 8 minutes on an H100/H200):
#   bash bench/gpu.sh [OUT_DIR]
# Installs the project with the CUDA build of torch, writes a 2.9B-shaped random RWKV-7 (32 x 2560,
# text-safe, bf16 on disk), then runs the engine benchmark and the serving benchmark on it in fp16 at
# 1, 32, 128 and 256 streams. Results (JSON + PNG) go to OUT_DIR (default: $OUT when the device tool
# runs it, else bench/results). Steps are bounded so the whole script fits the device tool's limit.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  # No torch pin: the CUDA build from the index this machine's pip uses.
  .venv-gpu/bin/pip install -q torch -e '.[bench]' httpx py-spy
fi
py=.venv-gpu/bin/python
$py -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-device.txt"

model=/tmp/bench-gpu/rwkv7-L32-D2560.pth
mkdir -p /tmp/bench-gpu
[ -f "$model" ] || timeout 240 $py -m rwkv_gateway demo-model "$model" --layers 32 --embd 2560

cd bench
timeout 240 ../$py engine.py --model "$model" --strategy "cuda fp16" --concurrency 1,32,128,256 \
  --tokens 64 --prefill-tokens 256 --no-package-baseline --out "../$out/engine-32x2560-gpu-fp16.json" \
  | tee "../$out/engine-32x2560-gpu-fp16.txt"
timeout 300 ../$py serving.py --model "$model" --strategy "cuda fp16" --users 1,32,128,256 \
  --dialects openai,roleplay --reply-tokens 128 --forward-seconds 2 \
  --out "../$out/serving-32x2560-gpu-fp16.json" | tee "../$out/serving-32x2560-gpu-fp16.txt"
