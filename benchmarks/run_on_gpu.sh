#!/usr/bin/env bash
# Every GPU check in one go, as run through the device tool on a lent CUDA machine (README, "GPU"):
#   1. the CUDA code paths' tests (tests/test_gpu.py, skipped on machines without CUDA);
#   2. benchmarks/gpu.py run: dense vs DRONE in fp32 and bf16, batch 1 and 32, 128 and 512 tokens, plus torch.compile.
# Wheels in .whl/ (the versions this project pins, when the machine's own are older) are installed first, if any.
# Results go to $OUT (default /tmp/gpu-out): gpu_tests.log, gpu.json, gpu_bench.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
python3 - <<'PY' || exit 1
import sentence_transformers, torch, transformers
import drone_hf
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}, transformers {transformers.__version__}, "
      f"sentence-transformers {sentence_transformers.__version__}, drone_hf {drone_hf.__version__}")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 benchmarks/gpu.py run --compile --output "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu_bench.log"
