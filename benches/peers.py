#!/usr/bin/env python3
"""kvt beside the tools a user would otherwise reach for, as whole processes,
interleaved in one run (peer, kvt, peer, kvt, ...), medians; prints one line
per comparison with the ratio. The peers are the shared set in ../shared/peers
(DVC, raw aiohttp against the Rust stub server, Python tiktoken, numpy's
bootstrap); their virtual environments come from its setup_venvs.sh.

    bash ../shared/peers/setup_venvs.sh WORK        # once: venv-dvc, venv-py
    cargo build --release --locked
    python3 benches/peers.py --work WORK [--runs 5] [--only dvc,client,tokenize,bootstrap,scale,remote]

Every kvt command runs the release binary in a scratch project under WORK.
The machine is shared and noisy: only the ratios of one interleaved run mean
anything, so copy the whole output into benches/README.md with its date.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, cwd=None, env=None, check=True):
    """One whole process: (wall s, CPU s of it and its children, peak RSS MiB, stderr)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    err = p.stderr.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if check and code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n{err[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0, err


def med(xs):
    return statistics.median(xs)


def interleave(runs, a, b, prep_a=None, prep_b=None):
    """Runs a() and b() alternately `runs` times after one warm-up each;
    returns the two lists of results."""
    ra, rb = [], []
    for i in range(runs + 1):
        if prep_a:
            prep_a(i)
        x = a(i)
        if prep_b:
            prep_b(i)
        y = b(i)
        if i > 0:
            ra.append(x)
            rb.append(y)
    return ra, rb


def line(what, peer_label, peer_s, kvt_s, unit="s"):
    ratio = peer_s / kvt_s if kvt_s > 0 else float("inf")
    fmt = (lambda v: f"{v * 1000:.1f} ms") if unit == "s" and max(peer_s, kvt_s) < 1 else (lambda v: f"{v:.3f} {unit}")
    print(f"{what:46s} {peer_label} {fmt(peer_s):>11s}   kvt {fmt(kvt_s):>11s}   ratio {ratio:6.1f}x", flush=True)


def project(work, name, files):
    """A scratch kvt project holding the given files."""
    d = os.path.join(work, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "config/experiments"))
    shutil.copy(os.path.join(REPO, "config/default.yaml"), os.path.join(d, "config"))
    for rel, text in files.items():
        path = os.path.join(d, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return d


def kvt_cmd(a, *args):
    return [a.kvt, *args]


def built_ms(stderr, node):
    m = re.search(rf"built {re.escape(node)} \(([0-9.]+) (ms|s)\)", stderr)
    if not m:
        return None
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "ms" else v


def dvc_section(a):
    peers, work = a.peers, a.work
    venv = os.path.join(work, "venv-dvc")
    repo = os.path.join(work, "dvc-repo")
    env = dict(os.environ, PATH=f"{venv}/bin:" + os.environ["PATH"], DVC_NO_ANALYTICS="1")
    if not os.path.exists(os.path.join(repo, "dvc.lock")):
        subprocess.run(["bash", os.path.join(peers, "dvc-pipeline/setup_repo.sh"), repo, venv],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, env=env, check=True)
    demo = open(os.path.join(REPO, "config/experiments/demo.yaml")).read()
    d = project(work, "kvt-demo", {"config/experiments/demo.yaml": demo})
    cfg = ["-c", "config/experiments/demo.yaml", "-q"]
    run(kvt_cmd(a, "build", "report", *cfg), cwd=d)  # cold build, untimed
    ra, rb = interleave(a.runs, lambda i: run(["dvc", "repro"], cwd=repo, env=env),
                        lambda i: run(kvt_cmd(a, "build", "report", *cfg), cwd=d))
    line("no-op build (demo)", "dvc repro", med(r[0] for r in ra), med(r[0] for r in rb))
    bump = [f"{venv}/bin/python", os.path.join(peers, "dvc-pipeline/set_param.py"), "params.yaml", "analyze.seed", "+1"]
    ra, rb = interleave(
        a.runs,
        lambda i: run(["dvc", "repro"], cwd=repo, env=env),
        lambda i: run(kvt_cmd(a, "build", "report", *cfg, "--set", f"analysis.bootstrap.seed={int(time.time() * 1000) % 10**9 + i}"), cwd=d),
        prep_a=lambda i: subprocess.run(bump, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL))
    line("analysis-only rebuild (demo)", "dvc repro", med(r[0] for r in ra), med(r[0] for r in rb))


def client_section(a):
    peers, work = a.peers, a.work
    venv_py = os.path.join(work, "venv-py", "bin", "python")
    target = os.path.join(work, "stub-target")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=os.path.join(peers, "stub-server"),
                   env=dict(os.environ, CARGO_TARGET_DIR=target), check=True)
    port = 8765
    pin1 = ["taskset", "-c", "1"] if shutil.which("taskset") else []
    pin0 = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    stub = subprocess.Popen([*pin1, os.path.join(target, "release/oai-stub"), "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        n = a.requests
        # The same prompts the peer sends, as a JSONL set for kvt.
        sys.path.insert(0, os.path.join(peers, "client"))
        from client_bench import make_prompt  # noqa: E402 (stdlib-only helper)
        recs = "".join(json.dumps({"id": f"r{i}", "prompt": make_prompt(i, 2048), "answers": ["x"]}) + "\n" for i in range(n))
        exp = f"""output: {{exp_group_id: req}}
dataset: {{name: req, task: req, source: file, path: data/req.jsonl,
          fields: {{id: id, question: null, context: prompt, answers: answers, meta: []}}}}
binning: {{n_bins: 1}}
sampling: {{n_per_bin: {n}}}
engine: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", concurrency: 64, max_retries: 0}}
kv: {{policies: [full], budgets: [1.0]}}
prompt: {{template: "{{context}}", system: ""}}
decoding: {{max_new_tokens: 8}}
"""
        d = project(work, "kvt-req", {"data/req.jsonl": recs, "config/experiments/req.yaml": exp})
        cfg = ["-c", "config/experiments/req.yaml", "-q"]
        run(kvt_cmd(a, "build", "prepare", *cfg), cwd=d)
        peer = [*pin0, venv_py, os.path.join(peers, "client/client_bench.py"), "--client", "aiohttp",
                "--n", str(n), "--concurrency", "64", "--prompt-bytes", "2048", "--url", f"http://127.0.0.1:{port}/v1"]
        stamp = int(time.time())
        ra, rb = interleave(a.runs, lambda i: run(peer),
                            lambda i: run([*pin0, *kvt_cmd(a, "build", "infer", *cfg, "--set", f"engine.label=run-{stamp}-{i}")], cwd=d))
        pw, kw = med(r[0] for r in ra), med(r[0] for r in rb)
        pc, kc = med(r[1] for r in ra), med(r[1] for r in rb)
        print(f"{'requests, ' + str(n) + ' x 2 KB, 64 in flight':46s} aiohttp {n / pw:8.0f} req/s   kvt {n / kw:8.0f} req/s   ratio {pw / kw:6.1f}x  (whole processes, incl. start-up)")
        print(f"{'  CPU per 1,000 requests':46s} aiohttp {pc / n * 1000:8.3f} s       kvt {kc / n * 1000:8.3f} s       ratio {pc / kc:6.1f}x")
    finally:
        stub.terminate()
        stub.wait()


def tokenize_section(a):
    peers, work = a.peers, a.work
    venv_py = os.path.join(work, "venv-py", "bin", "python")
    text = os.path.join(work, "text-42-10mb.txt")
    if not os.path.exists(text):
        subprocess.run([sys.executable, os.path.join(peers, "tokenize/gen_text.py"), "--seed", "42", "--mb", "10", "--out", text], check=True)
    bpe = os.path.join(work, "bpe")
    if not os.path.exists(os.path.join(bpe, "o200k_base.tiktoken")):
        subprocess.run(["bash", os.path.join(peers, "tokenize/fetch_bpe.sh"), bpe], check=True, stdout=subprocess.DEVNULL)
    cache = os.path.join(work, "tiktoken-cache")
    if not os.path.isdir(cache) or not os.listdir(cache):
        subprocess.run([venv_py, os.path.join(peers, "tokenize/tok_bench.py"), "--text", text, "--bpe-dir", bpe,
                        "--cache-dir", cache, "--repeats", "1"],
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, TIKTOKEN_CACHE_DIR=cache))
    body = open(text, encoding="utf-8").read()
    recs, i = [], 0
    while i < len(body):
        recs.append(json.dumps({"id": f"t{len(recs)}", "text": body[i:i + 8192], "answers": ["x"]}))
        i += 8192
    exp = """output: {exp_group_id: tok}
dataset: {name: tok, task: tok, source: file, path: data/text.jsonl,
          fields: {id: id, question: null, context: text, answers: answers, meta: []}}
binning: {n_bins: 4}
sampling: {n_per_bin: 10}
"""
    d = project(work, "kvt-tok", {"data/text.jsonl": "\n".join(recs) + "\n", "config/experiments/tok.yaml": exp})
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=cache)
    stamp = int(time.time())
    for enc in ("cl100k_base", "o200k_base"):
        ra, rb = interleave(
            a.runs,
            lambda i: run([venv_py, os.path.join(peers, "tokenize/tok_once.py"), enc, text], env=env),
            lambda i: run(kvt_cmd(a, "build", "prepare", "-q", "-c", "config/experiments/tok.yaml", "--set", f"tokenizer.name={enc}",
                                  "--set", f"dataset.seed={stamp + i}"), cwd=d))
        line(f"tokenize 10 MB, {enc}", "tiktoken", med(r[0] for r in ra), med(r[0] for r in rb))


def bootstrap_section(a):
    peers, work = a.peers, a.work
    venv_py = os.path.join(work, "venv-py", "bin", "python")
    # 3 budgets x 5 bins x 200 examples (15 cells + 10 paired differences), as the peer.
    exp = """output: {exp_group_id: boot}
dataset: {lengths: [200, 400, 600, 800, 1000], per_length: 200}
binning: {n_bins: 5, edges: [0, 300, 500, 700, 900, 1200]}
sampling: {n_per_bin: 200}
engine: {kind: reference}
kv: {policies: [streaming], budgets: [1.0, 0.5, 0.2]}
analysis: {bootstrap: {iters: 10000}}
"""
    d = project(work, "kvt-boot", {"config/experiments/boot.yaml": exp})
    cfg = ["-c", "config/experiments/boot.yaml"]
    run(kvt_cmd(a, "build", "analyze", *cfg), cwd=d)
    out = os.path.join(work, "boot.jsonl")
    stamp = int(time.time())

    def peer(i):
        if os.path.exists(out):
            os.remove(out)
        run([venv_py, os.path.join(peers, "bootstrap/boot_bench.py"), "--modes", "numpy-shared", "--repeats", "3", "--json", out])
        return json.loads(open(out).readline())["median_s"]

    def ours(i):
        _, _, _, err = run(kvt_cmd(a, "build", "analyze", *cfg, "--set", f"analysis.bootstrap.seed={stamp + i}"), cwd=d)
        return built_ms(err, "analyze")

    ra, rb = interleave(a.runs, peer, ours)
    line("bootstrap 25 cells x 200 x 10,000 (in process)", "numpy", med(ra), med(rb))


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def scale_section(a):
    work = a.work
    for n_per in (200, 1000):
        n = 10 * n_per
        exp = f"""output: {{exp_group_id: scale}}
dataset: {{lengths: [100, 150, 200, 250, 300, 350, 400, 450, 500, 550], per_length: {n_per}}}
binning: {{n_bins: 10, edges: [0, 125, 175, 225, 275, 325, 375, 425, 475, 525, 700]}}
sampling: {{n_per_bin: {n_per}}}
engine: {{kind: reference}}
kv: {{policies: [streaming, snapkv], budgets: [1.0, 0.5, 0.3, 0.2, 0.1]}}
analysis: {{bootstrap: {{iters: 1000}}}}
"""
        d = project(work, f"kvt-scale-{n}", {"config/experiments/scale.yaml": exp})
        cfg = ["-c", "config/experiments/scale.yaml", "-q"]
        w, _, rss, _ = run(kvt_cmd(a, "build", "report", *cfg), cwd=d)
        print(f"{'scale: ' + str(n) + ' examples x 10 cells, cold build':46s} {w:8.2f} s, peak {rss:.0f} MiB")
        walls, grows, peaks = [], [], []
        for i in range(a.runs):
            before = du(os.path.join(d, "cache"))
            w, _, rss, _ = run(kvt_cmd(a, "build", "report", *cfg, "--set", f"analysis.bootstrap.seed={i + 1}"), cwd=d)
            walls.append(w)
            peaks.append(rss)
            grows.append(du(os.path.join(d, "cache")) - before)
        run(kvt_cmd(a, "build", "report", *cfg), cwd=d)  # back to the first config, untimed
        noop = [run(kvt_cmd(a, "build", "report", *cfg), cwd=d)[0] for _ in range(a.runs)]
        print(f"{'  analysis-only rebuild':46s} {med(walls):8.3f} s, peak {med(peaks):.0f} MiB, cache +{med(grows) / 1e6:.1f} MB per change")
        print(f"{'  no-op build':46s} {med(noop) * 1000:8.1f} ms")


def memory_section(a):
    """Peak memory of a cold `kvt build report` at 100,000 short examples (the
    issue's 2 GiB target), and each stage's own peak, one stage at a time."""
    exp = """output: {exp_group_id: big}
dataset: {lengths: [100, 200, 300, 400, 500], per_length: 20000}
binning: {n_bins: 5, edges: [0, 150, 250, 350, 450, 700]}
sampling: {n_per_bin: 20000}
engine: {kind: reference}
kv: {policies: [streaming], budgets: [1.0, 0.5]}
analysis: {bootstrap: {iters: 200}}
"""
    d = project(a.work, "kvt-100k", {"config/experiments/big.yaml": exp})
    cfg = ["-c", "config/experiments/big.yaml", "-q"]
    w, _, rss, _ = run(kvt_cmd(a, "build", "report", *cfg), cwd=d)
    print(f"{'memory: 100,000 examples x 2 cells, cold build':46s} {w:8.2f} s, peak {rss / 1024:.2f} GiB", flush=True)
    shutil.rmtree(os.path.join(d, "cache"), ignore_errors=True)
    peaks = []
    for stage in ("prepare", "infer", "score", "analyze", "explorer", "sqlite_base", "report"):
        _, _, rss, _ = run(kvt_cmd(a, "build", stage, *cfg), cwd=d)
        peaks.append(f"{stage} {rss:.0f}")
    print(f"{'  peak MiB per stage, built alone':46s} " + ", ".join(peaks), flush=True)


def remote_section(a):
    """The remote cache (kvt alone): what pushing adds to an infer node
    against the shared stub, and a merge build over a remote holding 10,000
    responses against the same build from a warm local journal plus the
    transfer (`kvt cache pull`). The remote is a directory (`file://`)."""
    work = a.work
    # 1. Push overhead: 5,000 requests to the stub, with and without a remote.
    target = os.path.join(work, "stub-target")
    port = 8766
    stub = subprocess.Popen([os.path.join(target, "release/oai-stub"), "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        n = a.requests
        recs = "".join(json.dumps({"id": f"r{i}", "prompt": f"record {i} " + "lorem ipsum " * 170, "answers": ["x"]}) + "\n"
                       for i in range(n))
        exp = f"""output: {{exp_group_id: push}}
dataset: {{name: push, task: push, source: file, path: data/req.jsonl,
          fields: {{id: id, question: null, context: prompt, answers: answers, meta: []}}}}
binning: {{n_bins: 1}}
sampling: {{n_per_bin: {n}}}
engine: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", concurrency: 64, max_retries: 0}}
kv: {{policies: [full], budgets: [1.0]}}
prompt: {{template: "{{context}}", system: ""}}
decoding: {{max_new_tokens: 8}}
"""
        d = project(work, "kvt-push", {"data/req.jsonl": recs, "config/experiments/push.yaml": exp})
        cfg = ["-c", "config/experiments/push.yaml"]
        run(kvt_cmd(a, "build", "prepare", "-q", *cfg), cwd=d)
        stamp = int(time.time())

        def infer(i, remote):
            env = dict(os.environ)
            args = ["--remote", "off"]
            if remote:
                dest = os.path.join(work, f"remote-push-{stamp}-{i}")
                env["KVT_REMOTE"] = "file://" + dest
                args = []
            _, _, _, err = run(kvt_cmd(a, "build", "infer", *cfg, *args, "--set", f"engine.label=push-{stamp}-{i}-{int(remote)}"),
                               cwd=d, env=env)
            if remote:
                shutil.rmtree(dest, ignore_errors=True)
            return built_ms(err, "infer[budget=1.0,policy=full]")
        ra, rb = interleave(a.runs, lambda i: infer(i, False), lambda i: infer(i, True))
        off, on = med(ra), med(rb)
        print(f"{'remote: infer node, ' + str(n) + ' requests to the stub':46s} no remote {off:7.3f} s   pushing {on:7.3f} s   +{(on / off - 1) * 100:5.1f} %", flush=True)
    finally:
        stub.terminate()
        stub.wait()

    # 2. A merge build over a remote holding 10,000 responses.
    exp = """output: {exp_group_id: merge}
dataset: {lengths: [100, 200, 300, 400, 500], per_length: 400}
binning: {n_bins: 5, edges: [0, 150, 250, 350, 450, 700]}
sampling: {n_per_bin: 400}
engine: {kind: reference}
kv: {policies: [streaming], budgets: [1.0, 0.5, 0.3, 0.2, 0.1]}
analysis: {bootstrap: {iters: 1000}}
"""
    d = project(work, "kvt-merge", {"config/experiments/merge.yaml": exp})
    remote = os.path.join(work, f"remote-merge-{int(time.time())}")
    env = dict(os.environ, KVT_REMOTE="file://" + remote)
    cfg = ["-c", "config/experiments/merge.yaml", "-q"]
    for i in range(2):
        run(kvt_cmd(a, "build", "infer", *cfg, "--shard", f"{i}/2"), cwd=d, env=dict(env, KVT_CACHE_DIR=f"w{i}"))
    # What the workers left: answers, and the prepare result; restored after
    # each merge so every merge pulls answers rather than finished results.
    backup = remote + "-actions"
    shutil.copytree(remote + "/v1/actions", backup)
    merges, locals_, pulls = [], [], []
    for i in range(a.runs):
        for c in (f"m{i}", f"l{i}", f"p{i}"):
            shutil.rmtree(os.path.join(d, c), ignore_errors=True)
        # The transfer: everything the remote holds, into an empty cache.
        w, _, _, _ = run(kvt_cmd(a, "cache", "pull"), cwd=d, env=dict(env, KVT_CACHE_DIR=f"p{i}"))
        pulls.append(w)
        # The same build from a warm local journal (pulled first, untimed).
        run(kvt_cmd(a, "cache", "pull"), cwd=d, env=dict(env, KVT_CACHE_DIR=f"l{i}"))
        w, _, _, _ = run(kvt_cmd(a, "build", "report", *cfg, "--remote", "off"), cwd=d, env=dict(env, KVT_CACHE_DIR=f"l{i}"))
        locals_.append(w)
        # The merge build: an empty cache, the remote.
        w, _, _, _ = run(kvt_cmd(a, "build", "report", *cfg), cwd=d, env=dict(env, KVT_CACHE_DIR=f"m{i}"))
        merges.append(w)
        shutil.rmtree(remote + "/v1/actions", ignore_errors=True)
        shutil.copytree(backup, remote + "/v1/actions")
        for c in (f"m{i}", f"l{i}", f"p{i}"):
            shutil.rmtree(os.path.join(d, c), ignore_errors=True)
    m, l, p = med(merges), med(locals_), med(pulls)
    print(f"{'remote: merge build, 10,000 responses':46s} merge {m:7.3f} s   local {l:7.3f} s + pull {p:7.3f} s   ratio {m / (l + p):5.2f}", flush=True)
    shutil.rmtree(remote, ignore_errors=True)
    shutil.rmtree(backup, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="where setup_venvs.sh put venv-dvc and venv-py; scratch projects go here")
    ap.add_argument("--peers", default=os.path.join(os.path.dirname(REPO), "shared", "peers"))
    ap.add_argument("--kvt", default=os.path.join(REPO, "target", "release", "kvt"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--only", default="dvc,client,tokenize,bootstrap,scale,memory,remote")
    a = ap.parse_args()
    a.work = os.path.abspath(a.work)
    a.kvt = os.path.abspath(a.kvt)
    print(f"== {time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} cores, {a.runs} interleaved runs each, medians; "
          f"kvt {subprocess.run([a.kvt, '--version'], capture_output=True, text=True).stdout.strip()}", flush=True)
    sections = {"dvc": dvc_section, "client": client_section, "tokenize": tokenize_section,
                "bootstrap": bootstrap_section, "scale": scale_section, "memory": memory_section,
                "remote": remote_section}
    for s in a.only.split(","):
        sections[s](a)


if __name__ == "__main__":
    main()
