#!/usr/bin/env bash
# Workload C (prefix sharing): 64 requests whose prompts share one 1,024-token prefix (the
# "system prompt"), each followed by its own 64 random tokens (the question); TTFT with prefix
# caching on and off, on the same server binary. Requests go one at a time by default (CONC=1),
# so TTFT measures prefill and not queueing; the first request warms the prefix.
#
# Usage: PEERS=... PAGODA_VENV=... bash benchmarks/workload_c.sh [pagoda] [vllm]
#        (no engine named: both). CONC, NUM_PROMPTS, PREFIX_LEN, ISL, OSL change the shape.
# Results: $RUN_DIR/c-<engine>-prefix-<on|off>.json and .txt.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONC=${CONC:-1}
NUM_PROMPTS=${NUM_PROMPTS:-64}
PREFIX_LEN=${PREFIX_LEN:-1024}
ISL=${ISL:-64}
OSL=${OSL:-16}
engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(pagoda vllm)

record_machine
status=0
for engine in "${engines[@]}"; do
  case $engine in
    pagoda | vllm) ;;
    *) echo "workload C runs pagoda and vllm (llama.cpp has no switch for it), not $engine" >&2
       exit 2 ;;
  esac
  for mode in on off; do
    flag=--enable-prefix-caching
    [ "$mode" = off ] && flag=--no-enable-prefix-caching
    tag=c-$engine-prefix-$mode
    log "workload C: $engine, prefix caching $mode"
    start_engine "$engine" "$tag" "$CONC" "$flag" || exit 2
    if wait_healthy "$ENGINE_PORT" "$ENGINE_PID" 900; then
      bench_serve "$tag" "$ENGINE_PORT" --random-prefix-len "$PREFIX_LEN" \
        --random-input-len "$ISL" --random-output-len "$OSL" --num-prompts "$NUM_PROMPTS" \
        --max-concurrency "$CONC" --ignore-eos --percentile-metrics ttft,tpot,itl,e2el \
        --metric-percentiles 50,90,99 || status=1
    else
      echo "$engine did not become healthy; see $RUN_DIR/logs/$tag.log" >&2
      status=1
    fi
    stop_engine
  done
done
echo "results in $RUN_DIR" >&2
exit $status
