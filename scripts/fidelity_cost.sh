#!/usr/bin/env bash
# What recording log-probabilities (top-5) and the teacher-forced gold and KL
# passes cost on the native experiment: the same build with and without them,
# each in a cache of its own (nothing shared but the dataset), wall time and
# peak memory from /usr/bin/time, and the `responses` artifacts' bytes per
# response from the infer nodes' action records.
#
#   cargo build --release --locked
#   KVT_MODEL=…/SmolLM2-135M-Instruct.Q4_1.gguf scripts/fidelity_cost.sh [experiment.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
exp="${1:-config/experiments/native-smollm2.yaml}"
kvt="${KVT_BIN:-target/release/kvt}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The reports stay for reading: KVT_FIDELITY_KEEP=DIR copies them there.
keep="${KVT_FIDELITY_KEEP:-}"
run() {
  local name="$1"; shift
  local cache="$work/cache-$name"
  /usr/bin/time -f "%e %M" -o "$work/time-$name" \
    env KVT_CACHE_DIR="$cache" "$kvt" build infer -c "$exp" "$@" > "$work/log-$name" 2>&1
  # The report from the answers just recorded (no request): its database
  # counts the responses.
  env KVT_CACHE_DIR="$cache" "$kvt" build report -c "$exp" "$@" > "$work/report-$name" 2>&1
  local id
  id="$(sed -n 's/^ *exp_group_id: *//p' "$exp" | head -1)"
  cp "runs/$id/kv_transition.sqlite" "$work/db-$name.sqlite"
  cp "runs/$id/report.md" "$work/report-$name.md"
  python3 - "$cache" "$name" "$(cat "$work/time-$name")" "$work/db-$name.sqlite" <<'PY'
import json, pathlib, sqlite3, sys
cache, name, timing = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3].split()
n = sqlite3.connect(sys.argv[4]).execute("SELECT COUNT(*) FROM responses").fetchone()[0]
size = rows = 0
for f in cache.glob("v1/actions/*/*.json"):
    d = json.loads(f.read_text())
    if d.get("op") != "infer":
        continue
    for o in d.get("outputs", []):
        if o["name"] == "responses":
            size += o["size"]
    rows += 1
print(f"{name}: infer wall {float(timing[0]):.1f} s, peak RSS {int(timing[1]) / 1024:.0f} MiB, "
      f"responses artifacts {size} bytes for {n} responses over {rows} infer nodes")
print(json.dumps({"name": name, "wall_s": float(timing[0]), "responses_bytes": size, "n": n}), file=sys.stderr)
PY
}
run with 2> "$work/with.json"
run without --set engine.logprobs=0 --set engine.fidelity=false 2> "$work/without.json"
python3 - "$work/with.json" "$work/without.json" "$work/log-with" <<'PY'
import json, re, sys
a, b = (json.loads(open(p).read()) for p in sys.argv[1:3])
print(f"infer wall time with / without: {a['wall_s'] / b['wall_s']:.3f}")
print(f"responses artifacts grew by {(a['responses_bytes'] - b['responses_bytes']) / a['n']:.0f} bytes per response")
PY
if [ -n "$keep" ]; then mkdir -p "$keep" && cp "$work"/report-*.md "$work"/db-*.sqlite "$keep"/; fi
