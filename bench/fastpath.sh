#!/usr/bin/env bash
# tollgate fast path benchmark (issue 13): one command, see bench/README.md ("Fast path").
#   bench/fastpath.sh [label] [bench/fastpath.py options...]
# e.g. bench/fastpath.sh                 -> bench/results/<date>-fastpath.md + .json (~20 min)
#      bench/fastpath.sh --quick         -> bench/results/<date>-fastpath-smoke.md + .json (~3 min)
# Environment: BENCH_NO_BUILD=1 skips the release build; CARGO_TARGET_DIR is honoured (the
# binaries are taken from $CARGO_TARGET_DIR/release, default target/release).
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
quick=0
for arg in "$@"; do [[ "$arg" == --quick ]] && quick=1; done
if [[ $# -gt 0 && "$1" != -* ]]; then
  LABEL="$1"
  shift
elif ((quick)); then
  LABEL=fastpath-smoke
else
  LABEL=fastpath
fi

log() { echo "[fastpath $(date -u +%H:%M:%S)] $*"; }

# ---- prerequisites ----------------------------------------------------------
. "$BENCH/lib.sh"
require_tools nginx haproxy wrk valgrind openssl taskset python3
if ! command -v callgrind_control >/dev/null; then
  log "callgrind_control missing (valgrind without it?): instructions per request will be skipped"
fi

# ---- binaries (cargo is a no-op when fresh; niced so other builds are not starved) ----
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR";; esac
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
  log "building release tollgate and examples/bare_proxy into $TARGET_DIR (nice -n 19; fat LTO, long on a busy box)"
  (cd "$REPO" && CARGO_TARGET_DIR="$TARGET_DIR" nice -n 19 cargo build --release --bin tollgate --example bare_proxy)
fi
export TOLLGATE_BIN="$TARGET_DIR/release/tollgate"
BARE_BIN="$TARGET_DIR/release/examples/bare_proxy"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- machine facts --------------------------------------------------------------
result_paths fastpath
bare_tls="no: examples/bare_proxy.rs has no BARE_PROXY_TLS_SNI knob, bare pingora measured with the plain upstream only"
grep -q BARE_PROXY_TLS_SNI "$REPO/examples/bare_proxy.rs" 2>/dev/null && bare_tls="yes (BARE_PROXY_TLS_SNI)"
write_facts \
  "HAProxy=$(haproxy -v 2>/dev/null | head -1 | awk '{print $3}')" \
  "OpenSSL=$(openssl version 2>/dev/null)" \
  "bare pingora binary=$BARE_BIN (built $(date -u -r "$BARE_BIN" +%FT%TZ 2>/dev/null || echo 'missing'))" \
  "bare pingora with a TLS upstream=$bare_tls"

# ---- run -------------------------------------------------------------------------------
python3 "$BENCH/fastpath.py" --label "$LABEL" --facts "$FACTS" --out-md "$MD" --out-json "$RAW" \
  --tollgate "$TOLLGATE_BIN" --bare-proxy "$BARE_BIN" "$@"
log "wrote $MD (raw: $RAW)"
