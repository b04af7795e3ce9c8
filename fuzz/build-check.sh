#!/usr/bin/env bash
# CI check for the fuzz crate, on stable Rust and without cargo-fuzz:
#  - `cargo fmt --check` (the main crate's `cargo fmt --all` does not reach fuzz/);
#  - `cargo clippy --all-targets -- -D warnings`: every fuzz target compiles and is
#    lint-clean (libfuzzer-sys's build script compiles libFuzzer, so a C++ compiler is
#    needed: g++ is installed with apt-get when missing);
#  - `cargo test --lib`: the committed seeds (seeds/<target>/*) are replayed through the
#    targets' code as an ordinary test; a panic fails it.
# It builds into the main crate's target/ so that the dependencies already compiled
# there by `cargo clippy` / `cargo test` are reused. fuzz/Cargo.lock (git-ignored) is
# derived from ../Cargo.lock so that they resolve to the same versions; only
# libfuzzer-sys and `arbitrary` are added.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v c++ >/dev/null 2>&1; then
  SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "fuzz/build-check: installing g++ (libfuzzer-sys builds libFuzzer)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++ >/dev/null
fi
cp ../Cargo.lock Cargo.lock
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(cd .. && pwd)/target}"
cargo fmt --manifest-path Cargo.toml --check
cargo clippy --manifest-path Cargo.toml --all-targets -- -D warnings
cargo test --manifest-path Cargo.toml --lib
