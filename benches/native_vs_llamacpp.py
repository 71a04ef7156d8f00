#!/usr/bin/env python3
"""Prefill and decode throughput of kvt's native engine beside llama.cpp's server
(xllamacpp), on the same GGUF, same machine, 2 threads each, one interleaved
run: for each prompt, llama.cpp then kvt. Full cache, greedy, no prompt cache.

    KVT_MODEL=... target/ci-venv/bin/python benches/native_vs_llamacpp.py target/release/kvt

Prefill tokens/s: prompt tokens / prefill time (llama.cpp's `timings.prompt_ms`;
kvt's `kvt.native.prefill_ms`). Decode tokens/s: generated tokens after the
first / decode time (llama.cpp's `predicted_ms`; kvt's `decode_ms`, which also
covers building the cell's cache). Peak RSS of each server from /proc.
"""
import json, os, socket, statistics, subprocess, sys, time, urllib.request

kvt_bin = os.path.abspath(sys.argv[1])
model = os.environ["KVT_MODEL"]
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))


def wait(url):
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


lport = free_port()
llama = subprocess.Popen([sys.executable, os.path.join(repo, "scripts/xllamacpp_server.py"), "--port", str(lport),
                          "--cache-type", "f16", "--ctx", "4096", "--threads", "2", "--model", model],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
kvt = subprocess.Popen([kvt_bin, "serve", "--port", "0", "--model-file", model], stdout=subprocess.PIPE)
kaddr = kvt.stdout.readline().decode().split()[-1]
laddr = f"http://127.0.0.1:{lport}"
try:
    wait(laddr + "/health")
    wait(kaddr + "/health")
    filler = ("The ferry crossed the estuary twice an hour, carrying bicycles and crates. "
              "A retired surveyor kept a notebook of every bridge he had crossed. ")
    rows = {"llama.cpp": [], "kvt": []}
    for words in [300, 300, 600, 600, 900, 900]:
        body_text = (filler * (words // 24 + 1))
        prompt = f"Here is a document.\n\n{body_text}\n\nQuestion: Summarise the document in detail.\nAnswer:"
        msgs = [{"role": "system", "content": "You write long, detailed answers."}, {"role": "user", "content": prompt}]
        base = {"model": "m", "messages": msgs, "max_tokens": 64, "temperature": 0.0, "cache_prompt": False}
        r = post(laddr + "/v1/chat/completions", base)
        t = r["timings"]
        rows["llama.cpp"].append((t["prompt_n"] / t["prompt_ms"] * 1000, (t["predicted_n"] - 1) / t["predicted_ms"] * 1000 if t["predicted_n"] > 1 else float("nan"), t["prompt_n"]))
        r = post(kaddr + "/v1/chat/completions", dict(base, kvt={"policy": "full", "budget": 1.0, "sink_tokens": 4, "window": 64, "pool_kernel": 5, "seed": 0}))
        n = r["kvt"]["native"]
        # A new prompt each time (the kvt prefill cache must not serve it).
        rows["kvt"].append((n["prompt_tokens"] / n["prefill_ms"] * 1000, (n["completion_tokens"] - 1) / n["decode_ms"] * 1000 if n["completion_tokens"] > 1 else float("nan"), n["prompt_tokens"]))
        filler = filler[1:] + filler[0]
    print(f"{'engine':<10} {'prompt tokens':>14} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for eng, rs in rows.items():
        for p, d, n in rs:
            print(f"{eng:<10} {n:>14} {p:>14.1f} {d:>13.1f}")
    for eng, rs in rows.items():
        print(f"median {eng}: prefill {statistics.median(r[0] for r in rs):.1f} tok/s, decode {statistics.median(r[1] for r in rs):.1f} tok/s")
    print(f"peak RSS: llama.cpp server {peak_rss_kib(llama.pid) / 1024:.0f} MiB, kvt serve {peak_rss_kib(kvt.pid) / 1024:.0f} MiB")
finally:
    llama.kill()
    kvt.kill()
    llama.wait()
    kvt.wait()
