#!/usr/bin/env bash
# Times the README's main job (the demo) as a user runs it, from a cold cache in
# a scratch project, then the no-op and the analysis-only rebuilds. Needs a
# release binary: `cargo build --release --locked` first.
#   bash benches/demo.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$repo/target/release/kvt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/config/experiments"
cp "$repo/config/default.yaml" "$tmp/config/"
cp "$repo/config/experiments/demo.yaml" "$tmp/config/experiments/"
cd "$tmp"
t() { /usr/bin/time -f "$1: %e s wall, %M KiB peak RSS" "$bin" build report -q -c config/experiments/demo.yaml "${@:2}"; }
t "demo, cold cache"
t "no-op rebuild"
t "analysis-only rebuild" --set analysis.bootstrap.iters=2001
echo "requests in the journal: $(python3 -c "import sqlite3;print(sqlite3.connect('cache/v1/journal.sqlite').execute('select count(*) from responses').fetchone()[0])")"
sed -n '/^| policy/,/^$/p' runs/demo/report.md
