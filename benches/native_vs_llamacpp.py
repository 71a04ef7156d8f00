#!/usr/bin/env python3
"""Prefill and decode throughput of kvt's native engine beside llama.cpp's server
(xllamacpp), on the same GGUF file, same machine, the same thread count, one
interleaved run: for each prompt, llama.cpp then kvt. Full cache, greedy, no
prompt cache, plain completions (`/v1/completions`), so base models work too.

    target/ci-venv/bin/python benches/native_vs_llamacpp.py target/release/kvt \\
        --model $KVT_MODEL --model $KVT_GEMMA_MODEL --lengths 1000,4000,8000

Prefill tokens/s: prompt tokens / prefill time (llama.cpp's `timings.prompt_ms`;
kvt's `kvt.native.prefill_ms`). Decode tokens/s: generated tokens after the
first / decode time (llama.cpp's `predicted_ms`; kvt's `decode_ms`, which also
covers building the cell's cache). Decode ms/token at each length shows how
decoding slows with context. Peak RSS of each server (VmHWM) after the
model's prompts; a server per model, so each model's peak is its own.
"""
import argparse, json, os, socket, subprocess, sys, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("kvt")
ap.add_argument("--model", action="append", required=True, help="a .gguf file (repeat for several)")
ap.add_argument("--lengths", default="1000,4000,8000", help="prompt lengths in tokens (approximate)")
ap.add_argument("--new-tokens", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
kvt_bin = os.path.abspath(a.kvt)
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
lengths = [int(x) for x in a.lengths.split(",")]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=1800))


def wait(url):
    for _ in range(900):
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def count_tokens(addr, text):
    r = post(addr + "/tokenize", {"content": text})
    return len(r["tokens"])


FILLER = [
    "The ferry crossed the estuary twice an hour, carrying bicycles and crates.",
    "A retired surveyor kept a notebook of every bridge he had crossed.",
    "In late autumn the orchard smelled of wet leaves and forgotten apples.",
    "The library's reading room was quiet except for the ticking radiator.",
    "Fog settled in the valley overnight and lifted by noon.",
]


def prompt_of(kaddr, tokens, shift):
    """A document of about `tokens` tokens (by kvt's tokenizer of the model)."""
    sentences, text = [], ""
    per = count_tokens(kaddr, " ".join(FILLER)) / len(FILLER)
    n = int(tokens / per)
    while True:
        sentences = [FILLER[(i + shift) % len(FILLER)] for i in range(n)]
        text = "Here is a document.\n\n" + " ".join(sentences) + "\n\nWrite a long summary of the document.\nSummary:"
        have = count_tokens(kaddr, text)
        if have >= tokens * 0.97 or n > 100000:
            return text, have
        n += max(1, int((tokens - have) / per))


print(f"{'model':<28} {'engine':<10} {'prompt':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode ms/tok':>14}")
summary = []
for model in a.model:
    name = os.path.basename(model)
    ctx = max(lengths) + a.new_tokens + 256
    lport = free_port()
    llama = subprocess.Popen([sys.executable, os.path.join(repo, "scripts/xllamacpp_server.py"), "--port", str(lport),
                              "--cache-type", "f16", "--ctx", str(ctx), "--threads", str(a.threads), "--model", model],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    kvt = subprocess.Popen([kvt_bin, "serve", "--port", "0", "--model-file", model], stdout=subprocess.PIPE, env=env)
    kaddr = kvt.stdout.readline().decode().split()[-1]
    laddr = f"http://127.0.0.1:{lport}"
    try:
        wait(laddr + "/health")
        wait(kaddr + "/health")
        rows = {}
        for i, n in enumerate(lengths):
            text, have = prompt_of(kaddr, n, i)
            base = {"model": "m", "prompt": text, "max_tokens": a.new_tokens, "temperature": 0.0,
                    "cache_prompt": False, "ignore_eos": True}
            r = post(laddr + "/v1/completions", base)
            t = r["timings"]
            ll = (t["prompt_n"] / t["prompt_ms"] * 1000, (t["predicted_n"] - 1) / t["predicted_ms"] * 1000, t["prompt_n"])
            r = post(kaddr + "/v1/completions", base)  # the full cache (kvt serve's default)
            k = r["kvt"]["native"]
            kv = (k["prompt_tokens"] / k["prefill_ms"] * 1000, (k["completion_tokens"] - 1) / k["decode_ms"] * 1000, k["prompt_tokens"])
            rows[n] = (ll, kv)
            for eng, (p, d, m) in (("llama.cpp", ll), ("kvt", kv)):
                print(f"{name:<28} {eng:<10} {m:>7} {p:>14.1f} {d:>13.1f} {1000 / d:>14.1f}", flush=True)
        for n, (ll, kv) in rows.items():
            summary.append(f"{name:<28} ~{n:>5} tokens: prefill {kv[0] / ll[0]:.2f}x, decode {kv[1] / ll[1]:.2f}x llama.cpp")
        lo, hi = min(rows), max(rows)
        summary.append(f"{name:<28} kvt decode ms/token at {hi} vs {lo}: {rows[lo][1][1] / rows[hi][1][1]:.2f}x "
                       f"(llama.cpp {rows[lo][0][1] / rows[hi][0][1]:.2f}x)")
        summary.append(f"{name:<28} peak RSS: llama.cpp server {peak_rss_mib(llama.pid):.0f} MiB, kvt serve {peak_rss_mib(kvt.pid):.0f} MiB")
    finally:
        llama.kill()
        kvt.kill()
        llama.wait()
        kvt.wait()
print("\n".join(summary))
