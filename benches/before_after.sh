#!/usr/bin/env bash
# Two kvt binaries, one interleaved run: the demo from a cold cache and the
# no-op rebuild, timed alternately (so drift on the machine hits both alike);
# then the checks a refactoring must pass: the new binary finds every node of
# the old one's cache fresh, answers `infer` again from the old journal
# without sending a request, and writes the same report.md, report.html and
# SQLite rows.
#   bash benches/before_after.sh OLD_BIN NEW_BIN [ROUNDS] [OLD_REV]
# OLD_REV (a commit; default HEAD) gives the projects their config files:
# the old binary must read the configuration it was built with.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); rounds=${3:-3}; rev=${4:-HEAD}
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
project() {
  mkdir -p "$1/config/experiments"
  git -C "$repo" show "$rev:config/default.yaml" > "$1/config/default.yaml"
  git -C "$repo" show "$rev:config/experiments/demo.yaml" > "$1/config/experiments/demo.yaml"
}
secs() { # BIN DIR ARGS… → wall seconds of `BIN build report -q …` in DIR
  local bin=$1 dir=$2 t0 t1; shift 2
  t0=$(date +%s%N)
  if ! (cd "$dir" && "$bin" build report -q -c config/experiments/demo.yaml "$@" >/dev/null 2>"$dir/err.log"); then
    echo "$bin failed in $dir: $(cat "$dir/err.log")" >&2
    exit 1
  fi
  t1=$(date +%s%N)
  awk -v ns=$((t1 - t0)) 'BEGIN {printf "%.4f", ns / 1e9}'
}
declare -A cold noop
for r in $(seq 1 "$rounds"); do
  for which in old new; do
    bin=${!which}; dir="$tmp/$which-$r"; project "$dir"
    cold[$which]+="$(secs "$bin" "$dir") "
  done
done
for r in $(seq 1 $((rounds * 5))); do
  for which in old new; do
    noop[$which]+="$(secs "${!which}" "$tmp/$which-1") "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for which in old new; do
  echo "$which: demo cold median $(echo "${cold[$which]}" | median) s (${cold[$which]% }); no-op median $(echo "${noop[$which]}" | median) s"
done
# The new binary on the old binary's cache: every node fresh…
dir="$tmp/old-1"
summary=$(cd "$dir" && "$new" build report -c config/experiments/demo.yaml 2>&1 | grep '^kvt: ' || true)
echo "new binary on the old cache: ${summary#kvt: }"
# …and `infer` forced to run again sends nothing: the old journal answers.
sent=$(cd "$dir" && KVT_LOG=info "$new" build report --force infer -c config/experiments/demo.yaml 2>&1 | grep -c 'sending requests' || true)
echo "new binary, infer forced on the old journal: $sent node(s) sent requests"
# The same outputs: the new binary recomputes every stage from the old
# journal's answers (latencies included) and must write the old bytes.
keep="$tmp/old-outputs"; mkdir -p "$keep"
cp "$dir/runs/demo/report.md" "$dir/runs/demo/report.html" "$dir/runs/demo/kv_transition.sqlite" "$keep/"
force=(); for st in prepare infer score analyze explorer plots sqlite_base sqlite report; do force+=(--force "$st"); done
(cd "$dir" && "$new" build report -q "${force[@]}" -c config/experiments/demo.yaml)
for f in report.md report.html kv_transition.sqlite; do
  if cmp -s "$keep/$f" "$dir/runs/demo/$f"; then echo "$f: identical"; else echo "$f: DIFFERS"; fi
done
