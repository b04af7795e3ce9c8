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
missing=()
for t in nginx wrk taskset python3; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})); then
  pkgs=()
  for t in "${missing[@]}"; do case "$t" in taskset) pkgs+=(util-linux);; *) pkgs+=("$t");; esac; done
  log "installing ${pkgs[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
fi
command -v valgrind >/dev/null || log "valgrind not installed: instructions per request are skipped (apt-get install valgrind to have it)"

# ---- binaries (cargo is a no-op when fresh; niced so other builds are not starved) ----
# Both the proxies and examples/dpop_cost (one proof alone) are release builds.
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
  log "building release tollgate and examples/dpop_cost (nice -n 19)"
  (cd "$REPO" && nice -n 19 cargo build --release --bin tollgate --example dpop_cost)
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- machine facts --------------------------------------------------------------
DAY="$(date -u +%F)"
OUTDIR="$BENCH/results"
mkdir -p "$OUTDIR"
name="$DAY-$LABEL"
[[ "$LABEL" == dpop* ]] || name="$DAY-dpop-$LABEL"
RAW="$OUTDIR/$name.json"
MD="$OUTDIR/$name.md"
FACTS="$(mktemp)"
trap 'rm -f "$FACTS"' EXIT
commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit yet')"
dirty="$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | wc -l)"
tv="$("$REPO/target/release/tollgate" --version 2>/dev/null || echo 'not built')"
tv="$tv (binary built $(date -u -r "$REPO/target/release/tollgate" +%FT%TZ 2>/dev/null || echo '?'))"
python3 - "$FACTS" <<PY
import json, sys
facts = {
  "date": "$(date -u +%FT%TZ)",
  "nproc": "$(nproc)",
  "CPU": "$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(lscpu | sed -n 's/^Hypervisor vendor: *//p' | head -1 | sed 's/^\(.\)/hypervisor \1/')",
  "memory": "$(free -g | awk '/^Mem:/{print $2}') GiB",
  "kernel": "$(uname -sr)",
  "OS": "$(. /etc/os-release; echo "$PRETTY_NAME")",
  "nginx": "$(nginx -v 2>&1 | sed 's/^nginx version: //')",
  "wrk": "$(wrk --version 2>&1 | head -1 | awk '{print $2}')",
  "valgrind": "$(valgrind --version 2>/dev/null || echo 'not installed')",
  "rustc": "$(rustc --version)",
  "tollgate": "$tv, git $commit" + (" + $dirty uncommitted changes in src/Cargo.*" if "$dirty" != "0" else ""),
  "load average at start": "$(cut -d' ' -f1-3 /proc/loadavg)",
}
json.dump(facts, open(sys.argv[1], "w"))
PY

# ---- run -------------------------------------------------------------------------------
python3 "$BENCH/dpop.py" --label "$LABEL" --facts "$FACTS" --out-md "$MD" --out-json "$RAW" \
  --tollgate "$REPO/target/release/tollgate" --dpop-cost "$REPO/target/release/examples/dpop_cost" "$@"
log "wrote $MD (raw: $RAW)"
