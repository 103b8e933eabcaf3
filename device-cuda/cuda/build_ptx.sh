#!/usr/bin/env bash
# Regenerates device-cuda/ptx/*.ptx from device-cuda/cuda/*.cu; `cargo xtask ptx` runs this.
# The PTX is committed, so building rill never needs a CUDA toolkit. compute_80 PTX is JIT-compiled
# by the driver for Ampere (A100) and every newer GPU (H100, H200...).
#
# Compiler: nvcc when on PATH (or $NVCC); otherwise NVRTC from pip, which compiles the same CUDA C:
#   pip install nvidia-cuda-nvrtc-cu12==12.4.127 nvidia-cuda-runtime-cu12==12.4.127
# (the nvidia-cuda-nvcc-cu12 wheel ships ptxas and libnvvm but not the nvcc driver itself).
set -euo pipefail
ARCH="${PTX_ARCH:-compute_80}"
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/../ptx"
mkdir -p "$OUT"
NVCC="${NVCC:-$(command -v nvcc || true)}"
PY="${PYTHON:-python3}"
CUDA_INC="$("$PY" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "include"))' 2>/dev/null || true)"
for src in "$HERE"/*.cu; do
    name="$(basename "$src" .cu)"
    if [ -n "$NVCC" ]; then
        "$NVCC" -ptx -arch="$ARCH" -std=c++17 -I"$HERE" -o "$OUT/$name.ptx" "$src"
    else
        "$PY" "$HERE/nvrtc_ptx.py" "$ARCH" "$src" "$OUT/$name.ptx" ${CUDA_INC:+"$CUDA_INC"}
    fi
    echo "ptx: $OUT/$name.ptx"
done
