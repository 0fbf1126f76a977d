#!/usr/bin/env bash
# One command: install minilora (CPU torch when none is installed) and run the demo pipeline on the embedded default.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/install.sh
python -m minilora.generate --model smollm2-135m --prompt "The patient was admitted with" --max-new-tokens 24
