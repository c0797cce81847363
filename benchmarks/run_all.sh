#!/usr/bin/env bash
# Every workload, side by side, into one run directory, then the tables for BENCHMARKS.md.
# Run on a quiet machine: llama.cpp's threads spin, and the client shares the cores.
#
# Usage: PEERS=... PAGODA_VENV=... bash benchmarks/run_all.sh
# Takes about an hour on 2 cores (vLLM-CPU alone spends ~1 min starting per server launch).
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${PEERS:?set PEERS}"
export RUN_DIR=${RUN_DIR:-$PEERS/runs/$(date +%Y%m%d-%H%M%S)}
status=0
bash "$here/cold_start.sh" pagoda vllm llamacpp || status=1
bash "$here/workload_a.sh" pagoda vllm llamacpp || status=1
bash "$here/workload_b.sh" pagoda vllm || status=1
bash "$here/workload_c.sh" pagoda vllm || status=1
python3 "$here/summarize.py" "$RUN_DIR" | tee "$RUN_DIR/summary.md"
exit $status
