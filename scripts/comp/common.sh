# Shared by the three CoMP recipes. Source it, then call `run_step NAME MODEL [flags...]`.
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
  SMOKE=1
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
    STAGE1_DATA=$REPO/scripts/data/stage1.yaml
    STAGE2_DATA=$REPO/scripts/data/stage2.yaml
    STAGE3_DATA=$REPO/scripts/data/stage3.yaml
    DATA_FLAGS=(--data_root "$COMP_DATA_ROOT" --image_folder "${COMP_IMAGE_FOLDER:-$COMP_DATA_ROOT/data}")
  else
    STAGE1_DATA=$ASSETS/toyworld/stage1.yaml
    STAGE2_DATA=$ASSETS/toyworld/stage2.yaml
    STAGE3_DATA=$ASSETS/toyworld/stage3.yaml
    DATA_FLAGS=()
  fi
  WORD_DIST=${WORD_DIST:-$ASSETS/word_dist.pt}
  # The reference's flags, shrunk to tiny models on one CPU (same steps, same switches).
  COMMON_FLAGS=(--use_cpu True --bf16 False --tf32 False --max_steps "$SMOKE_STEPS"
                --dataloader_num_workers 0 --save_steps 1000 --report_to none --logging_steps 1)
  if [[ -n "${DEEPSPEED_CONFIG:-}" ]]; then COMMON_FLAGS+=(--deepspeed "$DEEPSPEED_CONFIG"); fi
  scale_batch() { echo 2; }          # per-device batch
  scale_tokens() { echo 64; }        # max_num_vistoken
  scale_length() { echo 1024; }      # model_max_length
  scale_resize() { echo $(( $1 / 8 )); }   # force_resize 384 -> 48, 1024 -> 128
else
  SMOKE=0
  LAUNCHER=${COMP_LAUNCHER:-"torchrun --nproc_per_node ${NUM_GPUS:-8} -m"}
  DATA_ROOT=${COMP_DATA_ROOT:-$REPO}
  IMAGE_FOLDER=${COMP_IMAGE_FOLDER:-$DATA_ROOT/data}
  LLM_VERSION=${LLM_VERSION:-Qwen/Qwen2.5-0.5B-Instruct}
  SIGLIP=${SIGLIP:-google/siglip-so400m-patch14-384}
  DINOV2=${DINOV2:-facebook/dinov2-large}
  STAGE1_DATA=$REPO/scripts/data/stage1.yaml
  STAGE2_DATA=$REPO/scripts/data/stage2.yaml
  STAGE3_DATA=$REPO/scripts/data/stage3.yaml
  DATA_FLAGS=(--data_root "$DATA_ROOT" --image_folder "$IMAGE_FOLDER")
  WORD_DIST=${WORD_DIST:-}
  COMMON_FLAGS=(--deepspeed "${DEEPSPEED_CONFIG:-$REPO/scripts/zero3.json}" --bf16 True --tf32 True
                --num_train_epochs 1 --save_strategy steps --save_steps 1000 --save_total_limit 1
                --dataloader_num_workers 8 --logging_steps 1
                --report_to "$($PY -c 'import tensorboard' 2>/dev/null && echo tensorboard || echo none)")
  scale_batch() { echo "$1"; }
  scale_tokens() { echo "$1"; }
  scale_length() { echo "$1"; }
  scale_resize() { echo "$1"; }
fi

# Reference job template: cosine schedule, 3% warmup, no weight decay, gradient
# checkpointing, modality-grouped batches.
TEMPLATE_FLAGS=(--lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0.
                --gradient_checkpointing True --group_by_modality_length True --dataloader_drop_last True
                --resume_from_checkpoint auto)

# run_step NAME DATA [flags...]: train one step into $WORKDIR/$RUN/NAME.
run_step() {
  local name=$1 data=$2
  shift 2
  local out=$WORKDIR/$RUN/$name
  if [[ -f $out/config.json && -f $out/preprocessor_config.json ]]; then
    echo "== $RUN/$name: done already ($out)"
    return
  fi
  local prior=()
  if [[ -n "$WORD_DIST" ]]; then prior=(--word_dist_path "$WORD_DIST"); fi
  echo "== $RUN/$name"
  # shellcheck disable=SC2086
  $LAUNCHER comp.train --data_path "$data" "${DATA_FLAGS[@]}" --output_dir "$out" \
      "${COMMON_FLAGS[@]}" "${TEMPLATE_FLAGS[@]}" "${prior[@]}" "$@"
}

export_vfm() {  # export_vfm STEP OUT
  $PY -m comp export-vfm "$WORKDIR/$RUN/$1" --out "$2"
}
