#!/usr/bin/env python3
"""The prefill-once ratio of a native-engine experiment: the build's wall time
spent in inference over (one prefill per example + every cell's decode).

    /usr/bin/time -f %e target/release/kvt build report -c config/experiments/native-smollm2.yaml 2> build.log
    python3 benches/prefill_once.py runs/native-smollm2/kv_transition.sqlite build.log

The numerator is the wall time of the build minus the nodes that are not
`infer` (from the build's own log); the denominator sums, from the SQLite
telemetry, each example's prefill once and the decode time of every distinct
request. 1.0 means nothing but one prefill per example and the decodes ran.
"""
import re, sqlite3, sys

db, log = sys.argv[1], sys.argv[2]
text = open(log).read()
m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
if m:  # /usr/bin/time -v
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
else:  # /usr/bin/time -f %e: the last line
    wall = float(text.strip().splitlines()[-1])
other = sum(float(ms) for name, ms in re.findall(r"built (\S+) \((\d+) ms\)", text) if not name.startswith("infer")) / 1000
c = sqlite3.connect(db)
rows = c.execute("""SELECT q.example_id, q.request_key, t.prefill_ms, t.decode_ms, t.prefill_reused, t.completion_tokens
                    FROM requests q JOIN telemetry t USING (request_id)""").fetchall()
prefill = {}
decode = {}
for ex, key, p, d, reused, _ in rows:
    prefill[ex] = p
    decode[key] = d
ideal = (sum(prefill.values()) + sum(decode.values())) / 1000
print(f"examples {len(prefill)}, distinct requests {len(decode)}")
print(f"wall {wall:.1f} s, non-infer nodes {other:.1f} s, inference {wall - other:.1f} s")
print(f"one prefill per example {sum(prefill.values()) / 1000:.1f} s + all decodes {sum(decode.values()) / 1000:.1f} s = {ideal:.1f} s")
print(f"prefill-once ratio {(wall - other) / ideal:.2f}")
