#!/usr/bin/env bash
# Kills `qlab train` with SIGKILL at random moments (seeded), resumes it each time, and checks
# that the final weights equal those of an uninterrupted run, byte for byte: a checkpoint must
# be committed as a unit whatever the moment of the kill (issue #20).
#   scripts/kill_resume.sh [trials]        (QLAB, DATA and SEED can be set in the environment)
set -euo pipefail
cd "$(dirname "$0")/.."
QLAB=${QLAB:-.build/release/qlab}
DATA=${DATA:-data/shapes-tiny}
TRIALS=${1:-8}
RANDOM=${SEED:-1}
[ -x "$QLAB" ] || { echo "no $QLAB: run make release first"; exit 2; }
[ -d "$DATA" ] || { echo "no $DATA: run make data QUICK=1 first"; exit 2; }
args=(train --data "$DATA" --size tiny --epochs 6 --batch 8 --eval-every 100 --checkpoint-every 2)
ref=$(mktemp -d) run=$(mktemp -d)
trap 'rm -rf "$ref" "$run"' EXIT
start=$(date +%s.%N)
"$QLAB" "${args[@]}" --out "$ref" > /dev/null 2>&1
duration=$(echo "$(date +%s.%N) - $start" | bc)
kills=0
for i in $(seq "$TRIALS"); do
  "$QLAB" "${args[@]}" --out "$run" > /dev/null 2>&1 &
  pid=$!
  sleep "$(echo "scale=3; $duration * ($RANDOM % 1000) / 1000 / 2" | bc)"
  if kill -9 "$pid" 2> /dev/null; then kills=$((kills + 1)); fi
  wait "$pid" 2> /dev/null || true
done
"$QLAB" "${args[@]}" --out "$run" > /dev/null 2>&1
if cmp -s "$ref/model.safetensors" "$run/model.safetensors"; then
  echo "✓ $kills kills at random moments, resumed each time: final weights equal the uninterrupted run's"
else
  echo "✗ after $kills kills the resumed run's weights differ from the uninterrupted run's"; exit 1
fi
