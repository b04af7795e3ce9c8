#!/usr/bin/env bash
# Fuzz one target for a bounded time on stable Rust (no sanitizer: ASan needs nightly).
#   fuzz/run.sh <target> [seconds, default 60] [extra libFuzzer flags...]
# New corpus entries go to fuzz/corpus/<target>/ (git-ignored); the committed seeds in
# fuzz/seeds/<target>/ are read, never written. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
target="${1:?usage: fuzz/run.sh <target> [seconds] [libFuzzer flags...]}"
secs="${2:-60}"
shift $(( $# >= 2 ? 2 : 1 ))
cp ../Cargo.lock Cargo.lock
mkdir -p "corpus/$target" "artifacts/$target"
dict=()
if [ -f "dicts/$target.dict" ]; then dict=(-dict="dicts/$target.dict"); fi
exec cargo fuzz run --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" "$@"
