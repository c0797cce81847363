#!/usr/bin/env bash
# Workload A (serving): SmolLM2-135M-Instruct, 256 input / 128 output tokens, ignore_eos,
# /v1/completions, greedy, driven by `vllm bench serve` (CLIENT=pagoda: `pagoda bench serve`),
# at concurrency 1 (8 requests), 16 (64) and 64 (128). Each engine is started afresh for each
# level and stopped before the next engine starts.
#
# Usage: PEERS=... PAGODA_VENV=... bash benchmarks/workload_a.sh [pagoda] [vllm] [vllm_fp32] [llamacpp]
#        (no engine named: all four; vllm is vLLM-CPU in bfloat16, vllm_fp32 in float32, and the
#        faster of the two is the anchor on this machine). LEVELS="16:64" runs one level; ISL / OSL
#        change the shape.
# Results: $RUN_DIR/a-<engine>-c<concurrency>.json (vLLM's keys) and .txt (the result block).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LEVELS=${LEVELS:-"1:8 16:64 64:128"}
ISL=${ISL:-256}
OSL=${OSL:-128}
engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(pagoda vllm vllm_fp32 llamacpp)

record_machine
status=0
for engine in "${engines[@]}"; do
  for level in $LEVELS; do
    conc=${level%%:*} num_prompts=${level##*:} tag=a-$engine-c${level%%:*}
    log "workload A: $engine, concurrency $conc, $num_prompts requests"
    start_engine "$engine" "$tag" "$conc" || exit 2
    if wait_healthy "$ENGINE_PORT" "$ENGINE_PID" 900; then
      bench_serve "$tag" "$ENGINE_PORT" --random-input-len "$ISL" --random-output-len "$OSL" \
        --num-prompts "$num_prompts" --max-concurrency "$conc" --ignore-eos || status=1
    else
      echo "$engine did not become healthy; see $RUN_DIR/logs/$tag.log" >&2
      status=1
    fi
    stop_engine
  done
done
echo "results in $RUN_DIR" >&2
exit $status
