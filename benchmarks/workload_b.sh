#!/usr/bin/env bash
# Workload B (offline): 256 prompts of 256 random tokens, 128 output tokens each (EOS ignored),
# in-process: `pagoda bench throughput` against `vllm bench throughput` on the same model.
# `hf` adds the Hugging Face transformers static-batch baseline (../shared/peers/hf_baseline.py,
# batch 16, bf16; set HF_BASELINE to its path if it is elsewhere).
#
# Usage: PEERS=... PAGODA_VENV=... bash benchmarks/workload_b.sh [pagoda] [vllm] [vllm_fp32] [hf]
#        (no engine named: pagoda, vllm and vllm_fp32: vLLM in bfloat16 and in float32, the faster
#        of which is the anchor on this machine). NUM_PROMPTS / ISL / OSL change the shape.
# Results: $RUN_DIR/b-<engine>.json and .txt (the `Throughput: ...` lines).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NUM_PROMPTS=${NUM_PROMPTS:-256}
ISL=${ISL:-256}
OSL=${OSL:-128}
HF_BASELINE=${HF_BASELINE:-$BENCH_DIR/../../shared/peers/hf_baseline.py}
engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(pagoda vllm vllm_fp32)

record_machine
status=0
for engine in "${engines[@]}"; do
  tag=b-$engine
  log "workload B: $engine"
  case $engine in
    pagoda)
      require_pagoda
      # shellcheck disable=SC2086
      "$PAGODA_VENV/bin/pagoda" bench throughput ${PAGODA_MODEL:+--model "$PAGODA_MODEL"} \
        --dataset-name random --random-input-len "$ISL" --random-output-len "$OSL" \
        --num-prompts "$NUM_PROMPTS" --disable-tqdm --output-json "$RUN_DIR/$tag.json" \
        $PAGODA_ARGS > "$RUN_DIR/logs/$tag.log" 2>&1
      ;;
    vllm|vllm_fp32)
      dtype=bfloat16
      [ "$engine" = vllm_fp32 ] && dtype=float32
      # NOTE: vLLM's random dataset reads --random-input-len; its --input-len is ignored there.
      env "${VLLM_ENV[@]}" "$PEERS/venv-vllm/bin/vllm" bench throughput --model "$VLLM_MODEL" \
        --dtype "$dtype" --dataset-name random --random-input-len "$ISL" \
        --random-output-len "$OSL" --num-prompts "$NUM_PROMPTS" \
        --output-json "$RUN_DIR/$tag.json" > "$RUN_DIR/logs/$tag.log" 2>&1
      ;;
    hf)
      "$PEERS/venv-guidellm/bin/python" "$HF_BASELINE" "$HF_MODEL" 16 "$ISL" "$OSL" bfloat16 \
        > "$RUN_DIR/logs/$tag.log" 2>&1
      ;;
    *) echo "unknown engine: $engine (pagoda, vllm, vllm_fp32, hf)" >&2; exit 2 ;;
  esac || { status=1; echo "$engine failed; see $RUN_DIR/logs/$tag.log" >&2; }
  grep -E '^(Throughput:|Total num|HF transformers)' "$RUN_DIR/logs/$tag.log" | tee "$RUN_DIR/$tag.txt"
done
echo "results in $RUN_DIR" >&2
exit $status
