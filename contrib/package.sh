#!/usr/bin/env bash
# Builds the artisync packages into target/debian/ (and target/generate-rpm/ with --rpm):
# the release binary, then the completions and man pages it generates from its own CLI
# definitions (into target/assets/), then `cargo deb --no-build` and, with --rpm,
# `cargo generate-rpm`. Needs cargo-deb (`cargo install cargo-deb --locked`) and, for --rpm,
# cargo-generate-rpm. Prints the path of each package built.
set -euo pipefail
cd "$(dirname "$0")/.."

rpm=false
for arg in "$@"; do
  case "$arg" in
    --rpm) rpm=true ;;
    *) echo "usage: contrib/package.sh [--rpm]" >&2; exit 2 ;;
  esac
done

cargo build --release --locked --bin artisync
bin=target/release/artisync

assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/completions" "$assets/man"
"$bin" completions bash >"$assets/completions/artisync.bash"
"$bin" completions zsh >"$assets/completions/_artisync"
"$bin" completions fish >"$assets/completions/artisync.fish"
"$bin" man --dir "$assets/man"
gzip -9 -n "$assets"/man/*.1
# The release profile keeps line tables (for backtraces in development); the packaged
# binary drops them (125 MB -> 28 MB installed) and keeps its symbols, so a
# panic's backtrace still names the functions.
strip --strip-debug -o "$assets/artisync" "$bin"

cargo deb --no-build --locked
ls -1 target/debian/*.deb
if $rpm; then
  cargo generate-rpm
  ls -1 target/generate-rpm/*.rpm
fi
