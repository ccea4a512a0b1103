#!/usr/bin/env bash
# The main job on the built-in default model, from a fresh machine: set up, fetch SmolLM2,
# export it to a full and a draft GGUF (plus the layer report), then answer one chat prompt
# and print its speed and acceptance figures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/bridge fetch-models --no-hf-fixture
# bi scores layers in one pass (about 2 minutes in all on a quiet 2-core AVX2 EPYC, 3 on a
# busy one, most of it the full model's calibration text); the default, auto, picks shortlist or bi by the time it
# predicts on this machine and says so before it starts
.venv/bin/bridge export smollm2 --prune 0.1 --method bi -o out/smollm2 --force
.venv/bin/bridge generate out/smollm2/SmolLM2-135M-Instruct-Q4_1.gguf --chat --temp 0 -n 128 \
  -p "Explain in three sentences why the sky is blue."
