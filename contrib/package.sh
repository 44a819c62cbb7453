#!/usr/bin/env bash
# Builds the artisync packages into target/debian/ (and target/generate-rpm/ with --rpm):
# the release binary (or --profile's), then the completions and man pages it generates from its own CLI
# definitions (into target/assets/), then `cargo deb --no-build` and, with --rpm,
# `cargo generate-rpm`. Needs cargo-deb (`cargo install cargo-deb --locked`) and, for --rpm,
# cargo-generate-rpm. Prints the path of each package built.
set -euo pipefail
cd "$(dirname "$0")/.."

# --profile dev packages the binary `cargo test` has already built (CI does, to check the
# package without a second, optimized build of every dependency); releases use the default.
rpm=false
profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --rpm) rpm=true ;;
    --profile) profile=${2:?--profile needs a name}; shift ;;
    *) echo "usage: contrib/package.sh [--rpm] [--profile release|dev]" >&2; exit 2 ;;
  esac
  shift
done

cargo build --profile "$profile" --locked --bin artisync
case "$profile" in
  dev) bin=target/debug/artisync ;;
  *) bin=target/$profile/artisync ;;
esac

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
