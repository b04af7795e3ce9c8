# Shared by bench/fleet.sh and bench/dpop.sh (sourced, after BENCH, REPO, LABEL and log
# are set): prerequisites, where the results go, and the machine facts every report
# starts with.

# require_tools TOOL...: install what is missing with apt (taskset is util-linux's).
require_tools() {
  local missing=() pkgs=() t
  for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
  ((${#missing[@]})) || return 0
  for t in "${missing[@]}"; do case "$t" in taskset) pkgs+=(util-linux);; *) pkgs+=("$t");; esac; done
  log "installing ${pkgs[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
}

# result_paths KIND: sets RAW and MD (bench/results/<date>-<label>, the label prefixed
# with KIND unless it starts with it) and FACTS (a temporary file, removed on exit).
result_paths() {
  local kind="$1" day name
  day="$(date -u +%F)"
  mkdir -p "$BENCH/results"
  name="$day-$LABEL"
  [[ "$LABEL" == "$kind"* ]] || name="$day-$kind-$LABEL"
  RAW="$BENCH/results/$name.json"
  MD="$BENCH/results/$name.md"
  FACTS="$(mktemp)"
  trap 'rm -f "$FACTS"' EXIT
}

# write_facts [NAME=VALUE...]: the machine, the tools and the tollgate binary measured
# ($TOLLGATE_BIN, default target/release/tollgate), plus the caller's own entries, as JSON
# into $FACTS.
write_facts() {
  local commit dirty tv bin="${TOLLGATE_BIN:-$REPO/target/release/tollgate}"
  commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit yet')"
  dirty="$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | wc -l)"
  tv="$("$bin" --version 2>/dev/null || echo 'not built')"
  tv="$tv (binary built $(date -u -r "$bin" +%FT%TZ 2>/dev/null || echo '?'))"
  if [[ "$dirty" != 0 ]]; then tv="$tv, git $commit + $dirty uncommitted changes in src/Cargo.*"; else tv="$tv, git $commit"; fi
  python3 - "$FACTS" \
    "date=$(date -u +%FT%TZ)" \
    "nproc=$(nproc)" \
    "CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(lscpu | sed -n 's/^Hypervisor vendor: *//p' | head -1 | sed 's/^\(.\)/hypervisor \1/')" \
    "memory=$(free -g | awk '/^Mem:/{print $2}') GiB" \
    "kernel=$(uname -sr)" \
    "OS=$(. /etc/os-release; echo "$PRETTY_NAME")" \
    "$@" \
    "nginx=$(nginx -v 2>&1 | sed 's/^nginx version: //')" \
    "wrk=$(wrk --version 2>&1 | head -1 | awk '{print $2}')" \
    "valgrind=$(valgrind --version 2>/dev/null || echo 'not installed')" \
    "rustc=$(rustc --version)" \
    "tollgate=$tv" \
    "load average at start=$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
facts = dict(arg.split("=", 1) for arg in sys.argv[2:])
json.dump(facts, open(sys.argv[1], "w"))
PY
}
