#!/usr/bin/env bash
# tollgate DPoP cost benchmark: one command, see bench/README.md ("DPoP cost").
#   bench/dpop.sh [label] [bench/dpop.py options...]
# e.g. bench/dpop.sh                      -> bench/results/<date>-dpop.md + .json
#      bench/dpop.sh quick --rounds 1 --duration 3 --callgrind 500
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
LABEL="${1:-dpop}"
shift || true
case "$LABEL" in -*) echo "first argument is the label (got option $LABEL)" >&2; exit 2;; esac

log() { echo "[dpop $(date -u +%H:%M:%S)] $*"; }

# ---- prerequisites ----------------------------------------------------------
. "$BENCH/lib.sh"
require_tools nginx wrk taskset python3
command -v valgrind >/dev/null || log "valgrind not installed: instructions per request are skipped (apt-get install valgrind to have it)"

# ---- binaries (cargo is a no-op when fresh; niced so other builds are not starved) ----
# Both the proxies and examples/dpop_cost (one proof alone) are release builds.
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
  log "building release tollgate and examples/dpop_cost (nice -n 19)"
  (cd "$REPO" && nice -n 19 cargo build --release --bin tollgate --example dpop_cost)
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- machine facts --------------------------------------------------------------
result_paths dpop
write_facts

# ---- run -------------------------------------------------------------------------------
python3 "$BENCH/dpop.py" --label "$LABEL" --facts "$FACTS" --out-md "$MD" --out-json "$RAW" \
  --tollgate "$REPO/target/release/tollgate" --dpop-cost "$REPO/target/release/examples/dpop_cost" "$@"
log "wrote $MD (raw: $RAW)"
