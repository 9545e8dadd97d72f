#!/usr/bin/env bash
# GPU checks and benchmarks, prepared to run in a few minutes on a machine with an NVIDIA GPU.
# From the repository root:  PY=.venv/bin/python bash bench/gpu_check.sh   (results in runs/gpu_check/)
# Record the numbers in BENCHMARKS.md with the device named (nvidia-smi.txt / device.txt).
set -uo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt" || exit 1
# 1. the CUDA tests (skipped on CPU machines): Sinkhorn, kNN, every method training and evaluating on cuda
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/training/test_gpu.py tests/similarity/test_sinkhorn.py \
    tests/retrieval/test_knn.py -k "cuda or gpu or test_gpu" 2>&1 | tee "$OUT/tests.txt"
# 2. benchmarks on the GPU (each picks cuda when it is there)
timeout 150 $PY bench/structural.py --configs 4x128,4x512,7x512 --repeat 2 2>&1 | tee "$OUT/structural.txt"
timeout 120 $PY bench/training_step.py --method introspective --settings demo,paper --rounds 2 --steps 1 2>&1 | tee "$OUT/training_step_introspective.txt"
timeout 120 $PY bench/training_step.py --method grouping --losses margin,multisimilarity --rounds 2 --steps 1 2>&1 | tee "$OUT/training_step_grouping.txt"
timeout 300 $PY bench/index.py --sizes 100000,1000000 --dims 128,512 --queries 500 --threads "$(nproc)" 2>&1 | tee "$OUT/index.txt"
