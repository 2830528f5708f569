#!/usr/bin/env bash
# Builds the CUDA plugin .build/cuda/libqlcuda.so (run by `make cuda`).
# Uses nvcc from PATH if there is one; otherwise installs the CUDA 13 compiler wheels from
# PyPI into the git-ignored .venv-cuda (about 130 MB, seconds). Fat binary for
# sm_75/80/86/89/90 plus PTX for newer GPUs, static CUDA runtime, so the plugin needs only
# the driver at run time. Prints a check mark or a cross for nvcc and for a device. Then checks
# the engine kernels' element functions on the host (cuda/check/engine_ops_host.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.build/cuda
mkdir -p "$OUT"

if command -v nvcc >/dev/null 2>&1; then
  NVCC=$(command -v nvcc)
  ROOT=$(dirname "$(dirname "$NVCC")")
  LIB=$ROOT/lib64; [ -d "$LIB" ] || LIB=$ROOT/lib
else
  if [ ! -x .venv-cuda/bin/python ]; then python3 -m venv .venv-cuda; fi
  .venv-cuda/bin/pip install --quiet "nvidia-cuda-nvcc==13.*" "nvidia-cuda-runtime==13.*" "nvidia-cuda-cccl==13.*" "nvidia-nvjpeg==13.*"
  ROOT=$(.venv-cuda/bin/python -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
  NVCC=$ROOT/bin/nvcc
  LIB=$ROOT/lib
fi
if [ ! -x "$NVCC" ]; then echo "✗ nvcc: not found and could not be installed"; exit 1; fi
echo "✓ nvcc: $("$NVCC" --version | grep -o 'release [0-9.]*') ($NVCC)"

GENCODE="-gencode arch=compute_75,code=sm_75 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
 -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90"
"$NVCC" -O3 -std=c++17 --threads 2 -shared -cudart static -Xcompiler -fPIC,-fvisibility=hidden \
  -Icuda/include -I"$ROOT/include" $GENCODE cuda/*.cu -o "$OUT/libqlcuda.so.tmp" -L"$LIB" -ldl -lpthread -lrt
mv "$OUT/libqlcuda.so.tmp" "$OUT/libqlcuda.so"
# nvJPEG is opened at run time; keep the wheel's copy beside the plugin as a fallback
if [ -f "$LIB/libnvjpeg.so.13" ]; then cp -f "$LIB/libnvjpeg.so.13" "$OUT/"; fi
echo "✓ plugin: $OUT/libqlcuda.so ($(nm -D --defined-only "$OUT/libqlcuda.so" | grep -c ' T qlc_') exported symbol)"

# The engine kernels' element functions (cuda/engine_ops.cuh), compiled for the host against
# the C kernels they must equal: checks their index arithmetic and rounding without a GPU.
mkdir -p "$OUT/host-check"
for f in Sources/CKernels/*.c; do cc -O2 -std=c11 -fno-strict-aliasing -fPIC -fvisibility=hidden -ISources/CKernels/include -c "$f" -o "$OUT/host-check/$(basename "$f" .c).o" & done
wait
c++ -O2 -std=c++17 -ffp-contract=off -Drestrict=__restrict -Icuda -Icuda/include -ISources/CKernels/include cuda/check/engine_ops_host.cpp \
  "$OUT"/host-check/*.o -lpthread -lm -o "$OUT/host-check/engine_ops_host"
"$OUT/host-check/engine_ops_host"
# The plugin's ABI on the CPU (cuda/check/host_plugin.cpp), for `make gpu-emulated`: the Swift
# side of the GPU path tested without a GPU.
c++ -O2 -std=c++17 -fPIC -shared -fvisibility=hidden -ffp-contract=off -Drestrict=__restrict -Icuda -Icuda/include \
  -ISources/CKernels/include cuda/check/host_plugin.cpp "$OUT"/host-check/*.o -lpthread -lm -o "$OUT/host-check/libqlcuda-host.so"

cc -O2 -Icuda/include cuda/probe.c -o "$OUT/probe" -ldl
"$OUT/probe" "$OUT/libqlcuda.so"
