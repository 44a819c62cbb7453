#!/bin/sh
# Runs every fuzz target for N seconds (default 240), one after the other, one job each
# (never two fuzzers at once on a shared machine): fuzz/run.sh [SECONDS] [TARGET...]
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). What a run finds
# lands in fuzz/artifacts/<target>/; see fuzz/README.md for what to do with it.
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-240}
[ $# -gt 0 ] && shift
targets=${*:-"path peer_batch config xml_gate wso2_render"}
cargo +nightly fuzz build
for t in $targets; do
    echo "== $t: ${seconds}s"
    mkdir -p "fuzz/corpus/$t"
    dict=""
    [ -f "fuzz/dict/$t.dict" ] && dict="-dict=fuzz/dict/$t.dict"
    # 2 GiB RSS and 256 MiB per allocation: an input that needs more is a finding
    # (unbounded allocation), as is one that takes more than 10 s. -fork=1: one fuzzing
    # process at a time, restarted after a finding, so one run collects every finding.
    cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -fork=1 \
        -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 \
        -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=10 $dict
done
