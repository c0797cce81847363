#!/usr/bin/env bash
# The container entrypoint of Pagoda: builds the `pagoda serve` command line from the environment,
# then execs it, so the server replaces this shell and receives SIGTERM from the runtime directly
# (a graceful shutdown, exit 0).
#
# Variables (an empty or blank value counts as unset, and an unset variable adds no flag):
#   MODEL_NAME              the model to serve (MODEL); unset: the default SmolLM2-135M-Instruct
#   PORT                    --port (unset: 8000)
#   HOST                    --host (unset: 0.0.0.0, every interface of the container)
#   REVISION                --revision
#   API_KEY, VLLM_API_KEY   --api-key; API_KEY wins when both are set
#   CHAT_TEMPLATE           --chat-template (a file path or an inline Jinja template, verbatim)
#   TENSOR_PARALLEL_SIZE    --tensor-parallel-size
#   MAX_MODEL_LEN           --max-model-len
#   DTYPE                   --dtype
#   GPU_MEMORY_UTILIZATION  --gpu-memory-utilization
#   HF_TOKEN, HF_HOME       not flags: exported for huggingface_hub when set, removed when empty
#   EXTRA_ARGS              more `pagoda serve` flags, split on whitespace (no shell quoting, so
#                           a value cannot contain spaces: use PAGODA_<FLAG> for such values)
# Each flag's `PAGODA_<FLAG_NAME>` variable (PAGODA_PORT, PAGODA_MAX_MODEL_LEN, ...) ranks above
# the short name, exactly as `pagoda serve` ranks them itself, so the command printed here is the
# one the server would have chosen from the same environment. Values are trimmed like the server
# trims them (a key mounted from a file keeps no trailing newline); CHAT_TEMPLATE is kept verbatim.
# Arguments given to the entrypoint (`docker run IMAGE --max-num-seqs 8`) come last and win.
#
# PAGODA_ENTRYPOINT_DRY_RUN=1 prints the command, one argument per line, and exits 0;
# PAGODA_ENTRYPOINT_DRY_RUN=nul ends each argument with a NUL byte instead (exact even for an
# argument that holds a newline, such as an inline chat template).
set -euo pipefail

# pick [--verbatim] TARGET NAME...: set TARGET to the value of the first NAME that is not blank,
# trimmed unless --verbatim; to "" when every NAME is blank or unset. printf -v rather than $(...),
# which would drop the trailing newlines of an inline template.
# The locals are prefixed so that no TARGET can be shadowed by one of them.
pick() {
  local _pick_verbatim=0 _pick_target _pick_name _pick_value _pick_trimmed
  if [ "$1" = --verbatim ]; then
    _pick_verbatim=1
    shift
  fi
  _pick_target="$1"
  shift
  printf -v "$_pick_target" '%s' ""
  for _pick_name in "$@"; do
    _pick_value="${!_pick_name:-}"
    _pick_trimmed="${_pick_value#"${_pick_value%%[![:space:]]*}"}"
    _pick_trimmed="${_pick_trimmed%"${_pick_trimmed##*[![:space:]]}"}"
    if [ -n "$_pick_trimmed" ]; then
      if [ "$_pick_verbatim" = 1 ]; then
        printf -v "$_pick_target" '%s' "$_pick_value"
      else
        printf -v "$_pick_target" '%s' "$_pick_trimmed"
      fi
      return
    fi
  done
}

# Set by pick below; declared here so that every name is visibly assigned.
model="" host="" port="" revision="" api_key="" chat_template="" tensor_parallel_size=""
max_model_len="" dtype="" gpu_memory_utilization="" dry_run="" hf_value=""

pick model PAGODA_MODEL MODEL_NAME
pick host PAGODA_HOST HOST
pick port PAGODA_PORT PORT
pick revision PAGODA_REVISION REVISION
pick api_key PAGODA_API_KEY API_KEY VLLM_API_KEY
pick --verbatim chat_template PAGODA_CHAT_TEMPLATE CHAT_TEMPLATE
pick tensor_parallel_size PAGODA_TENSOR_PARALLEL_SIZE TENSOR_PARALLEL_SIZE
pick max_model_len PAGODA_MAX_MODEL_LEN MAX_MODEL_LEN
pick dtype PAGODA_DTYPE DTYPE
pick gpu_memory_utilization PAGODA_GPU_MEMORY_UTILIZATION GPU_MEMORY_UTILIZATION
pick dry_run PAGODA_ENTRYPOINT_DRY_RUN

# huggingface_hub reads these itself. An empty HF_HOME (`HF_HOME=` in a compose file) would make
# it cache models under a relative path, and an empty HF_TOKEN is sent as a bad token: remove both.
for name in HF_TOKEN HF_HOME; do
  pick hf_value "$name"
  if [ -n "$hf_value" ]; then
    export "$name=$hf_value"
  else
    unset "$name"
  fi
done

extra_args=()
# read -a splits on whitespace without expanding globs; -d '' reads every line, not the first.
read -r -d '' -a extra_args <<<"${EXTRA_ARGS:-}" || true

argv=(
  pagoda serve
  ${model:+"$model"}
  --host "${host:-0.0.0.0}"
  --port "${port:-8000}"
  ${revision:+--revision "$revision"}
  ${api_key:+--api-key "$api_key"}
  ${chat_template:+--chat-template "$chat_template"}
  ${tensor_parallel_size:+--tensor-parallel-size "$tensor_parallel_size"}
  ${max_model_len:+--max-model-len "$max_model_len"}
  ${dtype:+--dtype "$dtype"}
  ${gpu_memory_utilization:+--gpu-memory-utilization "$gpu_memory_utilization"}
  "${extra_args[@]}"
  "$@"
)

case "${dry_run,,}" in
  "" | 0 | false | no | off) ;;
  1 | true | yes | on)
    printf '%s\n' "${argv[@]}"
    exit 0
    ;;
  nul)
    printf '%s\0' "${argv[@]}"
    exit 0
    ;;
  *)
    echo "pagoda-entrypoint: PAGODA_ENTRYPOINT_DRY_RUN must be 1/0, true/false, yes/no, on/off" \
      "or nul, got '$dry_run'" >&2
    exit 2
    ;;
esac

# The command for the log, with the API key hidden: container logs are often widely readable.
shown=()
hide_next=0
for arg in "${argv[@]}"; do
  if [ "$hide_next" = 1 ]; then
    shown+=("<hidden>")
    hide_next=0
  else
    shown+=("$arg")
    if [ "$arg" = --api-key ]; then
      hide_next=1
    fi
  fi
done
echo "pagoda-entrypoint: exec ${shown[*]}" >&2

exec "${argv[@]}"
