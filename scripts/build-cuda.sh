#!/usr/bin/env bash
# Builds the CUDA binary on a machine with neither a GPU nor a CUDA toolkit, and packs it to send
# to one: dist/pipeline-cuda.zst (stripped, zstd). Idempotent: reuses .cuda/ and target/cuda/.
#
# CUDA 13.0 comes from PyPI wheels installed with `pip install --target` (nvcc, crt, nvvm, runtime,
# nvrtc, cublas, curand, cccl, all under .cuda/py/nvidia/cu13); no wheel ships the driver's
# libcuda.so, so a link-time stub with the driver's function names (taken from cudarc's bindings)
# stands in for it: the real one is loaded on the GPU machine. Stay on nvcc 13.0: a newer one
# emits a PTX ISA that driver 580 rejects. CUDA_COMPUTE_CAP defaults to 90 (H100/H200).
#
# `scripts/build-cuda.sh --check` only type-checks the CUDA build (all targets) with the same
# toolchain, without building or packing a binary (what CI runs).
#
# On the GPU machine: zstd -d pipeline-cuda.zst -o pipeline && chmod +x pipeline, with the CUDA 13
# runtime libraries (libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libcudart.so.13, e.g. the
# nvidia/cu13/lib of a PyTorch cu130 venv) and libnccl.so.2 (its nvidia/nccl/lib) on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_DIR=${CUDA_DIR:-$PWD/.cuda}
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-cccl==13.0.85"
mkdir -p "$CUDA_DIR"
if [ "$(cat "$CUDA_DIR/installed" 2>/dev/null)" != "$WHEELS" ]; then
  rm -rf "$CUDA_DIR/py"
  # shellcheck disable=SC2086
  python3 -m pip install --quiet --disable-pip-version-check --target "$CUDA_DIR/py" $WHEELS
  echo "$WHEELS" > "$CUDA_DIR/installed"
fi
root=$CUDA_DIR/py/nvidia/cu13
[ -x "$root/bin/nvcc" ] || { echo "build-cuda: no nvcc under $root; remove $CUDA_DIR/installed and retry" >&2; exit 1; }
# The build scripts and the linker look for unversioned names.
for f in "$root"/lib/lib*.so.*; do
  base=${f%%.so.*}.so
  [ -e "$base" ] || ln -s "$(basename "$f")" "$base"
done
# A stub libcuda.so.1 exporting every cu* symbol cudarc's driver bindings name.
cargo fetch --locked >/dev/null
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(grep -A1 'name = "cudarc"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')" | head -1)
stub=$CUDA_DIR/stub
if [ ! -f "$stub/libcuda.so" ]; then
  mkdir -p "$stub"
  grep -ohE '"cu[A-Za-z0-9_]+"|fn cu[A-Za-z0-9_]+' "$cudarc"/src/driver/sys/*.rs | tr -d '"' | sed 's/^fn //' | sort -u \
    | sed 's/.*/void &(void) {}/' > "$stub/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/stub.c"
  ln -sf libcuda.so "$stub/libcuda.so.1"
fi
# Likewise NCCL (the `nccl` feature): the real libnccl.so.2 is the GPU machine's (a PyTorch
# venv's nvidia/nccl/lib).
if [ ! -f "$stub/libnccl.so" ]; then
  grep -ohE 'fn nccl[A-Za-z0-9_]+' "$cudarc"/src/nccl/sys/*.rs | sed 's/^fn //' | sort -u \
    | sed 's/.*/void &(void) {}/' > "$stub/nccl_stub.c"
  cc -shared -fPIC -Wl,-soname,libnccl.so.2 -o "$stub/libnccl.so" "$stub/nccl_stub.c"
  ln -sf libnccl.so "$stub/libnccl.so.2"
fi
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export PATH=$root/bin:$PATH
export LIBRARY_PATH=$stub:$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="-L native=$stub -L native=$root/lib ${RUSTFLAGS:-}"
# Its own target dir: other RUSTFLAGS would otherwise rebuild the CPU release build each time.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
start=$(date +%s)
if [ "${1:-}" = "--check" ]; then
  cargo check --locked --features cuda,nccl --all-targets
  echo "build-cuda: cargo check --features cuda,nccl passed in $(( $(date +%s) - start )) s"
  exit 0
fi
cargo build --release --locked --features cuda,nccl
echo "build-cuda: built in $(( $(date +%s) - start )) s"
mkdir -p dist
strip -o dist/pipeline-cuda "$CARGO_TARGET_DIR/release/pipeline"
zstd -q -19 -T0 -f dist/pipeline-cuda -o dist/pipeline-cuda.zst
echo "build-cuda: dist/pipeline-cuda $(du -h dist/pipeline-cuda | cut -f1) stripped, dist/pipeline-cuda.zst $(du -h dist/pipeline-cuda.zst | cut -f1)"
