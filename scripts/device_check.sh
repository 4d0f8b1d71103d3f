#!/usr/bin/env bash
# The GPU check of issues "Big models", "CD at GEMM speed" and "Big checkpoints as they ship" (the
# 1.5B bf16 model computed in bf16 on the GPU, its GPU memory peak per block), for a lent device machine.
#
# Here, once:   make device-prep      (copies the shared data, the gguf wheel and SmolLM2's GGUF in two
#                                      halves into .device/, which git ignores)
# Then two device `run` calls back to back (the machine stays warm 30 s between them; the GGUF is
# 98 MB, over the 64 MiB a call carries):
#   run(command="cp .device/smollm2.part1 /tmp/", carry=[".device/smollm2.part1"], timeout_s=120)
#   run(command="bash scripts/device_check.sh", carry=[".device/data", ".device/wheels",
#       ".device/smollm2.part2"], timeout_s=540)
# Without the first call the check runs on a synthetic model of SmolLM2's exact architecture.
# Results: stdout (tables) and $OUT/device_check.json; record them in BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CDQ_DATA_DIR="$PWD/.device/data"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if ls .device/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
gguf=()
if [ -f /tmp/smollm2.part1 ] && [ -f .device/smollm2.part2 ]; then
    mkdir -p /tmp/smollm2 && cat /tmp/smollm2.part1 .device/smollm2.part2 > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    gguf=(--smollm2-gguf /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
# The kernel tests on the real GPU (the CPU runs them through Triton's interpreter in CI).
timeout 90 python3 -m pytest -q -x tests/test_kernels.py 2>&1 | tail -5 || true
timeout 470 python3 scripts/device_check.py "${gguf[@]}" --json "${OUT:-.}/device_check.json"
