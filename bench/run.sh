#!/usr/bin/env bash
# tollgate benchmark: one command, see bench/README.md.
#   bench/run.sh [label] [harness options...]
# e.g. bench/run.sh baseline
#      bench/run.sh quick --rounds 1 --duration 3 --cold-n 1000 --strace-requests 5000
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
LABEL="${1:-run}"
shift || true
case "$LABEL" in -*) echo "first argument is the label (got option $LABEL)" >&2; exit 2;; esac

log() { echo "[bench $(date -u +%H:%M:%S)] $*"; }

# ---- prerequisites ----------------------------------------------------------
missing=()
for t in nginx haproxy wrk strace taskset python3; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})); then
  pkgs=()
  for t in "${missing[@]}"; do case "$t" in taskset) pkgs+=(util-linux);; python3) pkgs+=(python3);; *) pkgs+=("$t");; esac; done
  log "installing ${pkgs[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null; then
  log "installing oha (cargo install oha --locked, niced)"
  nice -n 19 cargo install oha --locked || log "WARNING: oha install failed; latency/cold-start/strace steps will be skipped"
fi

# ---- binaries (cargo is a no-op when fresh; niced so other builds are not starved) ----
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
  log "building release tollgate + examples/bare_proxy (nice -n 19)"
  (cd "$REPO" && nice -n 19 cargo build --release --bin tollgate --example bare_proxy) \
    || { log "release build of tollgate failed; trying bare_proxy alone";
         (cd "$REPO" && nice -n 19 cargo build --release --example bare_proxy); }
fi

# ---- limits -------------------------------------------------------------------
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ "$(ulimit -n)" != unlimited && "$(ulimit -n)" -lt 65536 ]]; then
  ulimit -n 65536 2>/dev/null || log "ulimit -n capped at $(ulimit -n) (hard limit); 10k-connection cold start may hit EMFILE"
fi

# ---- machine facts --------------------------------------------------------------
DAY="$(date -u +%F)"
OUTDIR="$BENCH/results"
mkdir -p "$OUTDIR"
RAW="$OUTDIR/$DAY-$LABEL.json"
MD="$OUTDIR/$DAY-$LABEL.md"
FACTS="$(mktemp)"
trap 'rm -f "$FACTS"' EXIT
commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit yet')"
dirty="$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | wc -l)"
tv="$("$REPO/target/release/tollgate" --version 2>/dev/null || echo 'not built')"
tv="$tv (binary built $(date -u -r "$REPO/target/release/tollgate" +%FT%TZ 2>/dev/null || echo '?'))"
ohav="$(oha --version 2>/dev/null || echo 'not installed')"
python3 - "$FACTS" <<PY
import json, sys
facts = {
  "nproc": "$(nproc)",
  "CPU": "$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(lscpu | sed -n 's/^Hypervisor vendor: *//p' | head -1 | sed 's/^\(.\)/hypervisor \1/')",
  "memory": "$(free -g | awk '/^Mem:/{print $2}') GiB",
  "kernel": "$(uname -sr)",
  "OS": "$(. /etc/os-release; echo "$PRETTY_NAME")",
  "nginx": "$(nginx -v 2>&1 | sed 's/^nginx version: //')",
  "HAProxy": "$(haproxy -v | head -1 | awk '{print $3}')",
  "wrk": "$(wrk --version 2>&1 | head -1 | awk '{print $2}')",
  "oha": "$ohav",
  "rustc": "$(rustc --version)",
  "pingora": "0.9.1 (examples/bare_proxy.rs and tollgate)",
  "tollgate": "$tv, git $commit" + (" + $dirty uncommitted changes in src/Cargo.*" if "$dirty" != "0" else ""),
}
json.dump(facts, open(sys.argv[1], "w"))
PY

# ---- run -------------------------------------------------------------------------------
targets=ABCDE
if [[ ! -x "$REPO/target/release/tollgate" ]] || ! "$REPO/target/release/tollgate" --version >/dev/null 2>&1; then
  log "WARNING: target/release/tollgate missing or not runnable; measuring A C D E only"
  targets=ACDE
fi
python3 "$BENCH/harness.py" --label "$LABEL" --out "$RAW" --targets "$targets" "$@"
python3 "$BENCH/report.py" "$RAW" "$FACTS" > "$MD"
log "wrote $MD (raw: $RAW)"
