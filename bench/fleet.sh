#!/usr/bin/env bash
# tollgate fleet-mode benchmark: one command, see bench/README.md ("Fleet mode").
#   bench/fleet.sh [label] [bench/fleet.py options...]
# e.g. bench/fleet.sh                      -> bench/results/<date>-fleet.md + .json
#      bench/fleet.sh quick --replicas 1,4 --rounds 1 --duration 3 --callgrind 0
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
LABEL="${1:-fleet}"
shift || true
case "$LABEL" in -*) echo "first argument is the label (got option $LABEL)" >&2; exit 2;; esac

log() { echo "[fleet $(date -u +%H:%M:%S)] $*"; }

# ---- prerequisites ----------------------------------------------------------
. "$BENCH/lib.sh"
require_tools redis-server nginx wrk taskset python3
command -v valgrind >/dev/null || log "valgrind not installed: the callgrind comparison is skipped (apt-get install valgrind to have it)"

# ---- binaries (cargo is a no-op when fresh; niced so other builds are not starved) ----
# The replicas and the proxies under load are the release binary; the fleet_count driver
# (doubles + client traffic) is a debug example, its speed does not matter.
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
  log "building release tollgate and examples/fleet_count (nice -n 19)"
  (cd "$REPO" && nice -n 19 cargo build --release --bin tollgate)
  (cd "$REPO" && nice -n 19 cargo build --example fleet_count)
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- machine facts --------------------------------------------------------------
result_paths fleet
write_facts "redis-server=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"

# ---- run -------------------------------------------------------------------------------
python3 "$BENCH/fleet.py" --label "$LABEL" --facts "$FACTS" --out-md "$MD" --out-json "$RAW" \
  --tollgate "$REPO/target/release/tollgate" --fleet-count "$REPO/target/debug/examples/fleet_count" "$@"
log "wrote $MD (raw: $RAW)"
