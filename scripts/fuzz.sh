#!/usr/bin/env bash
# Fuzzes the readers of outside input with libFuzzer (issue #20): builds qlab-fuzz with
# -sanitize=fuzzer in .build-fuzz, then runs each target for SECONDS (default 60) from the
# committed seeds in fuzz/corpus/<target>/ (copied: the seeds are not changed). A crash, a
# trap, a hang (> 10 s per input) or memory over 4 GB fails the run; the input is saved in
# fuzz/findings/ (git-ignored) and should become a regression test.
#   scripts/fuzz.sh [seconds] [target ...]      targets: coco detections safetensors jpeg model onnx
#   scripts/fuzz.sh --self-test                 a planted trap must be found (the fuzzer can fail)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--self-test" ]; then
  swift build -c release --product qlab-fuzz --scratch-path .build-fuzz \
    -Xswiftc -sanitize=fuzzer -Xswiftc -DFUZZING -Xcc -fsanitize=fuzzer-no-link > /dev/null
  work=$(mktemp -d) && printf 'QL' > "$work/seed"
  if sh -c 'QL_FUZZ_TARGET=selftest .build-fuzz/release/qlab-fuzz "$1" -max_total_time=60 -seed=1 -artifact_prefix="$1/" > "$1/log" 2>&1' sh "$work" 2> /dev/null; then
    echo "✗ self-test: the planted trap was not found in 60 s"; exit 1
  fi
  grep -q "planted trap found" "$work/log" && echo "✓ self-test: the planted trap was found and reported" || { echo "✗ self-test: the run failed for another reason"; tail -5 "$work/log"; exit 1; }
  rm -rf "$work"
  exit 0
fi
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(coco detections safetensors jpeg model onnx)
swift build -c release --product qlab-fuzz --scratch-path .build-fuzz \
  -Xswiftc -sanitize=fuzzer -Xswiftc -DFUZZING -Xcc -fsanitize=fuzzer-no-link > /dev/null
bin=.build-fuzz/release/qlab-fuzz
mkdir -p fuzz/findings
status=0
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  cp fuzz/corpus/"$t"/* "$work"/
  maxlen=$(( $(ls -l fuzz/corpus/"$t" | awk 'NR > 1 { if ($5 > m) m = $5 } END { print m }') + 4096 ))
  log=$(mktemp)
  if QL_FUZZ_TARGET=$t "$bin" "$work" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len="$maxlen" \
       -seed=1 -print_final_stats=1 -artifact_prefix=fuzz/findings/"$t"- > "$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "✓ $t: $runs inputs in ${seconds} s, no crash"
  else
    echo "✗ $t: a finding (input saved under fuzz/findings/$t-*):"; grep -E "ERROR|Fatal error|==[0-9]+==" "$log" | head -5
    status=1
  fi
  rm -rf "$work" "$log"
done
exit $status
