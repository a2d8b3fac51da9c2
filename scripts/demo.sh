#!/usr/bin/env bash
# Set up everything and run a real job on an embedded mesh (no etcd needed): ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

corpus=demo-corpus
if [ ! -f "$corpus/.complete" ]; then
  rm -rf "$corpus"
  echo "== making a sample corpus of web access logs (JSON lines: plain, .gz, .zst, .lz4, 2,000 small files)" >&2
  "$VENV_PY" -m bench.corpus "$corpus" --shape demo
  touch "$corpus/.complete"
fi

rm -rf demo-out demo-counts
echo "== ETL: keep status >= 400, project ts/ip/url/status, write zstd-compressed JSON lines" >&2
meshctl run "$corpus" --task jsonl --param 'where=status>=400' --param fields=ts,ip,url,status --out demo-out

echo "== the first output records, in input order (meshctl cat)" >&2
meshctl cat demo-out | head -n 3

echo "== reduce: count requests per status" >&2
meshctl run "$corpus" --task count_by --param field=status --out demo-counts
