#!/usr/bin/env bash
# Workload D (structured output): workload A at concurrency 16 (64 requests of 256 random input
# tokens, 128 output, ignore_eos), each engine once unconstrained and once with every request
# carrying the same small JSON schema (`--extra-body` of the client adds it to every request:
# vLLM's `structured_outputs`, which Pagoda takes too). The schema's one string field has a
# minimum length no 128-token answer reaches, so constrained requests end at max_tokens exactly
# like the unconstrained ones and the output rates compare like for like.
#
# Usage: PEERS=... PAGODA_VENV=... bash benchmarks/workload_d.sh [pagoda] [vllm]
# Results: $RUN_DIR/d-<engine>-<free|json>.json and .txt.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONC=${CONC:-16}
NUM_PROMPTS=${NUM_PROMPTS:-64}
SCHEMA='{"structured_outputs": {"json": {"type": "object", "properties": {"answer": {"type": "string", "minLength": 2000}}, "required": ["answer"]}}}'
engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(pagoda vllm)

record_machine
status=0
for engine in "${engines[@]}"; do
  for mode in free json; do
    tag=d-$engine-$mode
    log "workload D: $engine, $mode, concurrency $CONC"
    start_engine "$engine" "$tag" "$CONC" || exit 2
    if wait_healthy "$ENGINE_PORT" "$ENGINE_PID" 900; then
      extra=()
      [ "$mode" = json ] && extra=(--extra-body "$SCHEMA")
      bench_serve "$tag" "$ENGINE_PORT" --random-input-len 256 --random-output-len 128 \
        --num-prompts "$NUM_PROMPTS" --max-concurrency "$CONC" --ignore-eos "${extra[@]}" \
        || status=1
    else
      echo "$engine did not become healthy; see $RUN_DIR/logs/$tag.log" >&2
      status=1
    fi
    stop_engine
  done
done
echo "results in $RUN_DIR" >&2
exit $status
