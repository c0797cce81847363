# shellcheck shell=bash disable=SC2034  # the variables here are read by the scripts sourcing it
# Shared helpers of the side-by-side benchmark scripts; sourced, never run.
#
# Environment (every script):
#   PEERS         where ../shared/peers/setup-peers.sh installed the peers (required)
#   PAGODA_VENV   the virtual environment holding `pagoda` (required for the pagoda engine)
#   RUN_DIR       where results go (default: $PEERS/runs/<date>-<time>, one directory per run)
#   PAGODA_MODEL  model argument of `pagoda serve` / `--model` of `pagoda bench` (default: none,
#                 i.e. the packaged SmolLM2-135M-Instruct GGUF)
#   PAGODA_ARGS   extra flags for `pagoda serve` / `pagoda bench throughput` (e.g. "--dtype bfloat16")
#   CLIENT        load generator of the serving workloads: vllm (default, `vllm bench serve`) or
#                 pagoda (`pagoda bench serve`, same flags)
#
# Every engine binds 127.0.0.1 on a free port and is stopped (SIGTERM, then SIGKILL) before the
# next one starts, also when a script is interrupted: engines never overlap, and two runs on one
# machine never collide on a port.

set -u

: "${PEERS:?set PEERS to the peers directory (see ../shared/peers/README.md)}"
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
RUN_DIR=${RUN_DIR:-$PEERS/runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN_DIR/logs"
RUN_DIR=$(cd "$RUN_DIR" && pwd)

GGUF_MODEL=$PEERS/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
HF_MODEL=$PEERS/models/hf/smollm2-135m-instruct          # tokenizer for every client
VLLM_MODEL=$PEERS/models/hf-vllm/smollm2-135m-instruct   # the same weights, as vLLM loads them
SERVED_NAME=smollm2
PAGODA_MODEL=${PAGODA_MODEL:-}
PAGODA_ARGS=${PAGODA_ARGS:-}
CLIENT=${CLIENT:-vllm}

# vLLM-CPU as the peers README runs it: both cores, 4 GiB of KV cache, no telemetry.
VLLM_ENV=(HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_CPU_KVCACHE_SPACE=4
          VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0)

ENGINE_PID=
ENGINE_PORT=
ENGINE_STARTED=

log() { printf '\n=== %s\n' "$*" >&2; }

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

now() { date +%s.%N; }

# seconds_since START: wall-clock seconds from START (a `now` value) until now, 2 decimals.
seconds_since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.2f", end - start }'; }

require_pagoda() { : "${PAGODA_VENV:?set PAGODA_VENV to the venv holding pagoda}"; }

# wait_healthy PORT PID TIMEOUT_S: 0 once GET /health answers 200, 1 if the engine died or timed out.
wait_healthy() {
  local port=$1 pid=$2 deadline
  deadline=$(( $(date +%s) + $3 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    kill -0 "$pid" 2>/dev/null || return 1
    curl -sf -o /dev/null "http://127.0.0.1:$port/health" && return 0
    sleep 0.05
  done
  return 1
}

# start_engine ENGINE LOG_NAME SLOTS [EXTRA FLAGS...]: launch pagoda | vllm | llamacpp serving
# $SERVED_NAME on a free port, in the background; sets ENGINE_PID, ENGINE_PORT and
# ENGINE_STARTED (the launch time, taken after the port is chosen).
# SLOTS is llama.cpp's number of parallel sequences (-np); the other engines ignore it.
start_engine() {
  local engine=$1 name=$2 slots=$3
  shift 3
  ENGINE_PORT=$(free_port)
  local out=$RUN_DIR/logs/$name.log
  ENGINE_STARTED=$(now)
  case $engine in
    pagoda)
      require_pagoda
      # shellcheck disable=SC2086  # PAGODA_MODEL / PAGODA_ARGS are word lists on purpose
      "$PAGODA_VENV/bin/pagoda" serve $PAGODA_MODEL --served-model-name "$SERVED_NAME" \
        --host 127.0.0.1 --port "$ENGINE_PORT" --max-model-len 2048 --disable-log-requests \
        $PAGODA_ARGS "$@" > "$out" 2>&1 &
      ;;
    vllm|vllm_fp32)
      # vllm runs in bfloat16, vllm_fp32 in float32: the anchor is whichever is faster on the
      # machine (bf16 where the CPU has bf16 units, float32 on AVX2-only CPUs).
      local dtype=bfloat16
      [ "$engine" = vllm_fp32 ] && dtype=float32
      env "${VLLM_ENV[@]}" "$PEERS/venv-vllm/bin/vllm" serve "$VLLM_MODEL" \
        --served-model-name "$SERVED_NAME" --host 127.0.0.1 --port "$ENGINE_PORT" \
        --dtype "$dtype" --max-model-len 2048 "$@" > "$out" 2>&1 &
      ;;
    llamacpp)
      "$PEERS/llama.cpp-src/build/bin/llama-server" -m "$GGUF_MODEL" --alias "$SERVED_NAME" \
        --host 127.0.0.1 --port "$ENGINE_PORT" -t 2 -np "$slots" -c $(( slots * 1024 )) \
        "$@" > "$out" 2>&1 &
      ;;
    *) echo "unknown engine: $engine (pagoda, vllm, vllm_fp32, llamacpp)" >&2; return 2 ;;
  esac
  ENGINE_PID=$!
}

stop_engine() {
  [ -n "$ENGINE_PID" ] || return 0
  kill "$ENGINE_PID" 2>/dev/null
  for _ in $(seq 1 300); do kill -0 "$ENGINE_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$ENGINE_PID" 2>/dev/null
  wait "$ENGINE_PID" 2>/dev/null
  ENGINE_PID=
}
trap 'stop_engine' EXIT
trap 'exit 130' INT TERM

# bench_serve TAG PORT [FLAGS...]: one `bench serve` run of the chosen CLIENT against PORT on the
# random dataset, greedy, saved as $RUN_DIR/TAG.json (vLLM's keys) with the result block in TAG.txt.
bench_serve() {
  local tag=$1 port=$2
  shift 2
  local client
  case $CLIENT in
    vllm) client=(env HF_HUB_OFFLINE=1 "$PEERS/venv-vllm/bin/vllm" bench serve) ;;
    pagoda) require_pagoda; client=("$PAGODA_VENV/bin/pagoda" bench serve) ;;
    *) echo "CLIENT must be vllm or pagoda, got $CLIENT" >&2; return 2 ;;
  esac
  timeout 1800 "${client[@]}" --backend openai --base-url "http://127.0.0.1:$port" \
    --endpoint /v1/completions --model "$SERVED_NAME" --tokenizer "$HF_MODEL" \
    --dataset-name random --random-range-ratio 0 --request-rate inf --temperature 0 --seed 0 \
    --save-result --result-dir "$RUN_DIR" --result-filename "$tag.json" --disable-tqdm \
    "$@" > "$RUN_DIR/logs/$tag.client.log" 2>&1
  local status=$?
  sed -n '/Serving Benchmark Result/,/^=*$/p' "$RUN_DIR/logs/$tag.client.log" | tee "$RUN_DIR/$tag.txt"
  [ "$status" -eq 0 ] || echo "client exited with $status; see $RUN_DIR/logs/$tag.client.log" >&2
  return "$status"
}

# record_machine: what the figures were measured on, once per run directory.
record_machine() {
  local out=$RUN_DIR/machine.txt
  [ -s "$out" ] && return 0
  {
    echo "date: $(date -Iseconds)"
    echo "host: $(uname -srm)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) CPUs"
    echo "cpu flags of note: $(grep -o -w -E 'avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16|avx_vnni|amx_tile|amx_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    if [ -n "${PAGODA_VENV:-}" ]; then
      echo "pagoda: $("$PAGODA_VENV/bin/pagoda" --version 2>/dev/null)," \
        "torch $("$PAGODA_VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
      echo "pagoda env:"
      "$PAGODA_VENV/bin/pagoda" env 2>/dev/null | sed 's/^/  /'
    fi
    [ -x "$PEERS/venv-vllm/bin/vllm" ] && echo "vllm: $("$PEERS/venv-vllm/bin/vllm" --version 2>/dev/null | tail -n1)"
    [ -f "$PEERS/llama.cpp-src/SOURCE_COMMIT.txt" ] && echo "llama.cpp: $(cat "$PEERS/llama.cpp-src/SOURCE_COMMIT.txt")"
  } > "$out"
  cat "$out" >&2
}
