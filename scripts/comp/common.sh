# Shared by the three CoMP recipe scripts. Source it, set RUN and VISION, then call
# `run_recipe RECIPE`: the recipe's stages and flags are package data (src/comp/recipes/).
#
# Environment (all optional):
#   COMP_SMOKE=1        smoke mode: tiny random checkpoints + toyworld data (the seed's mixtures
#                       instead when COMP_DATA_ROOT is set) on the CPU, a few
#                       optimizer steps per stage, same steps and flags otherwise; one process
#                       unless COMP_LAUNCHER says more, no DeepSpeed unless DEEPSPEED_CONFIG is
#                       set (the GPU recipe minus CUDA: COMP_LAUNCHER="torchrun --nproc_per_node 2 -m"
#                       DEEPSPEED_CONFIG=scripts/zero3.json)
#   COMP_WORKDIR        where every output goes (default: ./work_dirs)
#   COMP_DATA_ROOT      root of the seed's data/ tree; the stage YAMLs' json_path entries are
#                       relative to it (default: the repository root, i.e. ./data/...)
#   COMP_IMAGE_FOLDER   root of the records' relative image paths (default: COMP_DATA_ROOT/data,
#                       as the reference's --image_folder data next to its data/... json_paths)
#   COMP_LAUNCHER       command that starts `comp.train` (default: torchrun on NUM_GPUS GPUs;
#                       e.g. "deepspeed --num_gpus 8 --module", "python -m", "torchrun --nnodes 2 ... -m")
#   NUM_GPUS            GPUs per node for the default launcher (default 8)
#   LLM_VERSION         the LLM of Stage I: directory or Hub id (default Qwen/Qwen2.5-0.5B-Instruct)
#   DEEPSPEED_CONFIG    default scripts/zero3.json (scripts/zero2.json for ZeRO-2)
#   WORD_DIST           word-frequency prior for the alignment loss (`comp data prior`)
#   SMOKE_STEPS         optimizer steps per stage in smoke mode (default 3)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORKDIR=${COMP_WORKDIR:-$REPO/work_dirs}
mkdir -p "$WORKDIR"
PY=${PYTHON:-python}

if [[ "${COMP_SMOKE:-0}" != "0" ]]; then
  MODE=smoke
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # tiny models: one thread is fastest on small CPUs
  SMOKE_STEPS=${SMOKE_STEPS:-3}
  LAUNCHER=${COMP_LAUNCHER:-"$PY -m"}
  ASSETS=$WORKDIR/smoke_assets
  if [[ ! -f $ASSETS/ready ]]; then
    $PY -m comp tiny --out "$ASSETS/qwen2" --kind qwen2 >/dev/null
    $PY -m comp tiny --out "$ASSETS/siglip" --kind siglip >/dev/null
    $PY -m comp tiny --out "$ASSETS/dinov2" --kind dinov2 >/dev/null
    $PY -m comp data toyworld --out "$ASSETS/toyworld" --size small >/dev/null
    $PY -m comp data prior "$ASSETS/toyworld/stage2.yaml" --tokenizer "$ASSETS/qwen2" \
        --out "$ASSETS/word_dist.pt" >/dev/null
    touch "$ASSETS/ready"
  fi
  LLM_VERSION=$ASSETS/qwen2
  SIGLIP=$ASSETS/siglip
  DINOV2=$ASSETS/dinov2
  if [[ -n "${COMP_DATA_ROOT:-}" ]]; then   # the seed's mixtures, as `comp data prepare` wrote them
    STAGE_DATA=$REPO/scripts/data
    DATA_FLAGS=(--data_root "$COMP_DATA_ROOT" --image_folder "${COMP_IMAGE_FOLDER:-$COMP_DATA_ROOT/data}")
  else
    STAGE_DATA=$ASSETS/toyworld   # toyworld writes stage1.yaml ... like scripts/data
    DATA_FLAGS=()
  fi
  WORD_DIST=${WORD_DIST:-$ASSETS/word_dist.pt}
  LAUNCH_FLAGS=(--max_steps "$SMOKE_STEPS")
  if [[ -n "${DEEPSPEED_CONFIG:-}" ]]; then LAUNCH_FLAGS+=(--deepspeed "$DEEPSPEED_CONFIG"); fi
else
  MODE=gpu
  LAUNCHER=${COMP_LAUNCHER:-"torchrun --nproc_per_node ${NUM_GPUS:-8} -m"}
  DATA_ROOT=${COMP_DATA_ROOT:-$REPO}
  IMAGE_FOLDER=${COMP_IMAGE_FOLDER:-$DATA_ROOT/data}
  LLM_VERSION=${LLM_VERSION:-Qwen/Qwen2.5-0.5B-Instruct}
  SIGLIP=${SIGLIP:-google/siglip-so400m-patch14-384}
  DINOV2=${DINOV2:-facebook/dinov2-large}
  STAGE_DATA=$REPO/scripts/data
  DATA_FLAGS=(--data_root "$DATA_ROOT" --image_folder "$IMAGE_FOLDER")
  WORD_DIST=${WORD_DIST:-}
  LAUNCH_FLAGS=(--deepspeed "${DEEPSPEED_CONFIG:-$REPO/scripts/zero3.json}"
                --report_to "$($PY -c 'import tensorboard' 2>/dev/null && echo tensorboard || echo none)")
fi

# run_step NAME DATA START [flags...]: train one stage into $WORKDIR/$RUN/NAME on the mixture
# $STAGE_DATA/DATA, from the originals ($LLM_VERSION and $VISION) when START is empty, else
# from stage START's output.
run_step() {
  local name=$1 data=$2 start=$3
  shift 3
  local out=$WORKDIR/$RUN/$name
  if [[ -f $out/config.json && -f $out/preprocessor_config.json ]]; then
    echo "== $RUN/$name: done already ($out)"
    return
  fi
  local model=(--model_name_or_path "$WORKDIR/$RUN/$start") prior=()
  if [[ -z $start ]]; then model=(--model_name_or_path "$LLM_VERSION" --custom_visual_model "$VISION"); fi
  if [[ -n "$WORD_DIST" ]]; then prior=(--word_dist_path "$WORD_DIST"); fi
  echo "== $RUN/$name"
  # shellcheck disable=SC2086
  $LAUNCHER comp.train --data_path "$STAGE_DATA/$data" "${DATA_FLAGS[@]}" --output_dir "$out" \
      "${LAUNCH_FLAGS[@]}" "${prior[@]}" "${model[@]}" "$@"
}

export_vfm() {  # export_vfm STEP OUT
  $PY -m comp export-vfm "$WORKDIR/$RUN/$1" --out "$2"
}

# run_recipe RECIPE: the stages of the recipe src/comp/recipes/RECIPE.yaml in order, with its
# flags in $MODE (`python -m comp.recipes plan` prints them: NUL-separated fields, per stage
# "stage NAME DATA START N FLAG_1..FLAG_N", then "export STAGE"), then the export of the trained
# encoder to $VFM_OUT when the recipe names a stage to export.
run_recipe() {
  local plan fields=() field i=0 n
  plan=$(mktemp)
  if ! $PY -m comp.recipes plan "$1" --mode "$MODE" >"$plan"; then rm -f "$plan"; exit 2; fi
  while IFS= read -r -d '' field; do fields+=("$field"); done <"$plan"
  rm -f "$plan"
  while (( i < ${#fields[@]} )); do
    case ${fields[i]} in
      stage) n=${fields[i+4]}
             run_step "${fields[@]:i+1:3}" "${fields[@]:i+5:n}"
             i=$(( i + 5 + n )) ;;
      export) export_vfm "${fields[i+1]}" "$VFM_OUT"
              i=$(( i + 2 )) ;;
      *) echo "python -m comp.recipes plan $1: unexpected field ${fields[i]}" >&2; exit 2 ;;
    esac
  done
}
