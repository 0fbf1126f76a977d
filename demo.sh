#!/usr/bin/env bash
# One command: install minilora (CPU torch when none is installed), then the demo pipeline on the embedded
# default (SmolLM2-135M + a synthetic clinical corpus): DAPT, the five outcome tasks on top of it, the report.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/install.sh
python train_dapt.py
for task in mortality los pmv diagnoses procedures; do
  python train_task.py --task "$task"
done
python eval.py
