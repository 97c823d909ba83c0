#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need, then runs them.
# Tests read every output with Python polars, as users do, from a project-local virtual
# environment (.venv, ignored by git): pip may not touch the system Python (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import polars, numpy, pyarrow" 2>/dev/null; then
  if ! python3 -m venv .venv 2>/dev/null; then
    # Debian/Ubuntu ship venv separately.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null
    fi
    rm -rf .venv
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --disable-pip-version-check polars numpy pyarrow
fi
# Fonts for curves.png labels (without them the curves are drawn unlabelled).
if [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq fonts-dejavu-core) >/dev/null 2>&1 || echo "note: fonts-dejavu-core not installed; plots will have no labels"
fi
# Style and lints first: they fail in seconds, the tests take minutes.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked "$@"
