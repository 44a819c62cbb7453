#!/usr/bin/env bash
# A/B run of the sync bench: this checkout's agent against a reference commit's, alternating
# (ref, new, new, ref, ...) in one script, so both see the same machine state. Prints the
# medians over the rounds of (a) p50/p99 and (b) initial sync, and the ratios new/ref.
#
#   benches/ab.sh REF [ROUNDS]        e.g. benches/ab.sh 8eae8ee 3
#
# The reference is built in a temporary worktree into target/ab-ref (cold the first time, a
# few minutes on 2 cores; incremental after). Bench options pass through (ARTISYNC_BENCH_RUNS,
# ARTISYNC_BENCH_LOOPFS, ...).
set -euo pipefail
ref=${1:?usage: benches/ab.sh REF [ROUNDS]}
rounds=${2:-3}
cd "$(dirname "$0")/.."
root=$PWD
out=$(mktemp -d /tmp/artisync-ab-XXXXXX)
wt="$out/ref"
git worktree add -q --detach "$wt" "$ref"
trap 'git -C "$root" worktree remove --force "$wt" >/dev/null 2>&1 || true' EXIT

echo "== building this checkout and the reference $ref (release)"
cargo build --release --quiet
(cd "$wt" && CARGO_TARGET_DIR="$root/target/ab-ref" cargo build --release --quiet)
new_bin="$root/target/release/artisync"
ref_bin="$root/target/ab-ref/release/artisync"

for i in $(seq 1 "$rounds"); do
  # ABBA order (ref first in odd rounds, new first in even ones), so a drift of the machine
  # during the script does not favour one side.
  order="ref new"; [ $((i % 2)) -eq 0 ] && order="new ref"
  for side in $order; do
    bin=$ref_bin; [ "$side" = new ] && bin=$new_bin
    echo "== round $i: $side"
    ARTISYNC_BENCH_BIN="$bin" cargo bench --quiet --bench sync >"$out/$side.$i.txt" 2>&1 \
      || { tail -20 "$out/$side.$i.txt"; exit 1; }
    grep -E '^\((a|b)\)' "$out/$side.$i.txt" | grep -E 'p50|p99|initial sync, median of [0-9]+ vs rsync -a' || true
  done
done

# The artisync column of a summary row, in ms, for every round of one side.
values() { # side row-pattern
  for f in "$out/$1".*.txt; do
    grep -E "^$2" "$f" | head -1 | sed -E 's/^.{44} +([0-9.]+) ms.*/\1/'
  done
}
median() { sort -n | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

echo
echo "A/B over $rounds rounds (medians of the per-round figures), reference $ref"
printf '%-34s %12s %12s %8s\n' measurement reference new ratio
for m in "(a) 4 KB write A->B, p50" "(a) 4 KB write A->B, p99" "(b) initial sync, median of [0-9]+ vs rsync -a"; do
  pat=$(printf '%s' "$m" | sed 's/[()]/\\&/g')
  r=$(values ref "$pat" | median)
  n=$(values new "$pat" | median)
  label=$(printf '%s' "$m" | sed 's/, median of \[0-9\]+ vs rsync -a//')
  printf '%-34s %9s ms %9s ms %8s\n' "$label" "$r" "$n" "$(awk -v a="$n" -v b="$r" 'BEGIN {printf "%.3f", a/b}')"
done
echo "raw outputs: $out"
