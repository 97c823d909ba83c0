#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need, then runs them.
# Tests read every output with Python polars, as users do, from a project-local virtual
# environment (.venv, ignored by git): pip may not touch the system Python (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."
# (tensorboard: to read back `train --report-to tensorboard`'s event files as TensorBoard does)
if ! .venv/bin/python -c "import polars, numpy, pyarrow, tensorboard" 2>/dev/null; then
  if ! python3 -m venv .venv 2>/dev/null; then
    # Debian/Ubuntu ship venv separately.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null
    fi
    rm -rf .venv
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --disable-pip-version-check polars numpy pyarrow tensorboard
fi
# Fonts for curves.png labels (without them the curves are drawn unlabelled).
if [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq fonts-dejavu-core) >/dev/null 2>&1 || echo "note: fonts-dejavu-core not installed; plots will have no labels"
fi
# Data-parallel training is tested under Open MPI (the `mpi` feature binds the system's MPI
# with bindgen, hence libclang).
if ! command -v mpirun >/dev/null || [ ! -e /usr/lib/x86_64-linux-gnu/libmpi.so ] || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev libclang-dev) >/dev/null \
      || echo "note: Open MPI not installed; the data-parallel tests are skipped"
  fi
fi
features=()
if command -v mpirun >/dev/null && [ -e /usr/lib/x86_64-linux-gnu/libmpi.so ]; then
  features=(--features mpi)
fi
# Style and lints first: they fail in seconds, the tests take minutes.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
cargo fmt --check
cargo clippy --locked --all-targets "${features[@]}" -- -D warnings
cargo test --locked "${features[@]}" "$@"
# The default build under a launcher: a clear error, not N processes writing one directory.
if [ ${#features[@]} -gt 0 ]; then
  cargo test --locked --test distributed "$@"
fi
