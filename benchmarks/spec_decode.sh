#!/usr/bin/env bash
# Speculative decoding (n-gram prompt lookup) on a grounded workload: each request asks the
# default model to copy a ~600-token passage of benchmarks/data/perplexity.txt (a different
# window per request) and starts the copy, so that the output repeats its prompt, as editing,
# quoting and extraction do. 256 output tokens, greedy, /v1/completions, driven by
# `pagoda bench serve --dataset-name custom` (vLLM's custom JSONL dataset), at concurrency 1
# (8 requests) and 16 (32). Each engine runs with and without drafting, started afresh per level:
#   pagoda       plain decoding;  pagoda_spec  --speculative-config ngram, K drafts, lookup N..5
#   llamacpp     plain decoding;  llamacpp_spec --spec-type ngram-simple, lookup N, K drafts
#
# Usage: PEERS=... PAGODA_VENV=... bash benchmarks/spec_decode.sh [engines...]
#        (default: pagoda pagoda_spec llamacpp llamacpp_spec); K (3), N (2), OSL (256), LEVELS.
# Results: $RUN_DIR/s-<engine>-c<concurrency>.json and .txt; the grounded prompts in
# $RUN_DIR/grounded.jsonl.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_pagoda
CLIENT=pagoda  # vLLM's client applies a chat template to custom prompts; ours sends them as is

LEVELS=${LEVELS:-"1:8 16:32"}
K=${K:-3}
N=${N:-2}
OSL=${OSL:-256}
engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(pagoda pagoda_spec llamacpp llamacpp_spec)

PROMPTS=$RUN_DIR/grounded.jsonl
"$PAGODA_VENV/bin/python" - "$BENCH_DIR/data/perplexity.txt" "$PROMPTS" <<'PY'
import json, sys
words = open(sys.argv[1], encoding="utf-8").read().split()
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for i in range(32):
        start = (i * 23) % (len(words) - 450)
        passage = " ".join(words[start : start + 450])
        prompt = (
            "Copy the following passage exactly, word for word.\n\n"
            f"{passage}\n\nCopy:\n{' '.join(words[start : start + 8])}"
        )
        out.write(json.dumps({"prompt": prompt}) + "\n")
PY
TOKENIZER=$("$PAGODA_VENV/bin/python" -c \
  "from pagoda.loader.resolve import resolve_model; print(resolve_model(None).tokenizer_path)")

record_machine
status=0
for engine in "${engines[@]}"; do
  case $engine in
    pagoda_spec)
      base=pagoda
      extra=(--speculative-config
             "{\"method\": \"ngram\", \"num_speculative_tokens\": $K, \"prompt_lookup_min\": $N, \"prompt_lookup_max\": 5}") ;;
    llamacpp_spec)
      base=llamacpp
      extra=(--spec-type ngram-simple --spec-ngram-simple-size-n "$N" --spec-ngram-simple-size-m "$K"
             --spec-draft-n-max "$K") ;;
    *) base=$engine; extra=() ;;
  esac
  for level in $LEVELS; do
    conc=${level%%:*} num_prompts=${level##*:} tag=s-$engine-c$conc
    log "speculative decoding: $engine, concurrency $conc, $num_prompts requests"
    start_engine "$base" "$tag" "$conc" "${extra[@]}" || exit 2
    if wait_healthy "$ENGINE_PORT" "$ENGINE_PID" 900; then
      bench_serve "$tag" "$ENGINE_PORT" --dataset-name custom --dataset-path "$PROMPTS" \
        --custom-output-len "$OSL" --tokenizer "$TOKENIZER" --num-prompts "$num_prompts" \
        --max-concurrency "$conc" --ignore-eos --num-warmups 1 || status=1
      # The acceptance counters, where the engine has them.
      curl -s "http://127.0.0.1:$ENGINE_PORT/metrics" | grep -E '^pagoda:spec_decode_num_(draft|accepted)_tokens_total' \
        | tee "$RUN_DIR/$tag.spec.txt" || true
    else
      echo "$engine did not become healthy; see $RUN_DIR/logs/$tag.log" >&2
      status=1
    fi
    stop_engine
  done
done
echo "results in $RUN_DIR" >&2
exit $status
