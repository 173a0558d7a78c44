#!/usr/bin/env bash
# One-shot submission of the three streamlift jobs to the cluster, in order (compose service
# `submit`): features on $STREAMLIFT_INPUT, then outcomes and learner on the features job's
# hand-off in $STREAMLIFT_DATA_DIR. Each `flink run` waits for its bounded job to finish.
# With SIMULATE_EVENTS > 0 and no input yet, the simulator writes a demo input first.
set -euo pipefail

ROOT=/opt/streamlift
PY=/opt/venv/bin/python
INPUT="${STREAMLIFT_INPUT:-/data/sim}"
DATA="${STREAMLIFT_DATA_DIR:-/data/run}"
export STREAMLIFT_ON_CLUSTER=1 STREAMLIFT_PATHS__DATA_DIR="$DATA"

if [ ! -d "$INPUT/manifest" ] && [ "${SIMULATE_EVENTS:-0}" -gt 0 ]; then
  echo "submit: simulating ${SIMULATE_EVENTS} events into $INPUT"
  (cd "$ROOT" && "$PY" -m tools.simulate --events "$SIMULATE_EVENTS" --out "$INPUT")
fi

run() {  # run <job> <input>
  echo "submit: $1 (input $2, data $DATA)"
  flink run -m "${FLINK_JOBMANAGER:-jobmanager:8081}" ${FLINK_PARALLELISM:+-p "$FLINK_PARALLELISM"} \
    -py "$ROOT/jobs/$1.py" -pyfs "$ROOT/schemas,$ROOT/udfs,$ROOT/jobs,$ROOT/stores,$ROOT/serving" \
    -pyexec "$PY" -pyclientexec "$PY" \
    --input "$2" --data-dir "$DATA"
}

cd "$ROOT"
run features "$INPUT"
run outcomes "$DATA"
run learner "$DATA"
echo "submit: done"
