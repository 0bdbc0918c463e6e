#!/usr/bin/env bash
# GPU readiness suite (issue 9): one command for a session with a lent GPU; installs nothing,
# <= 8 minutes on one H100, prints one table at the end.
#
#   bash benchmarks/gpu_suite.sh                # on the GPU machine (~5-8 min on one H100)
#   bash benchmarks/gpu_suite.sh --cpu-smoke    # the same parts at tiny sizes on CPU (~3 min)
#
# Parts (each under its own time limit; a part that fails or runs out of time says why in
# its row and the suite goes on):
#   1 packed vs padded SigLIP-So400M encoder, fwd and fwd+bwd, per attention backend
#     (flash / varlen / sdpa; "unavailable" where the backend is not there)   bench_encoder.py
#   2 LM loss peak memory at 65,536 tokens, full fp32 logits vs chunked        bench_lm_loss.py
#   3 real-width Stage II step: tokens/s, peak GiB, MFU (vs 989 spec and 777 measured)
#                                                                              bench_train_step.py
#   4 ZeRO-3 on one process: torchrun + comp.train --deepspeed scripts/zero3.json, Stage II
#     flags on tiny checkpoints and toyworld written here, 5 steps: step time, losses finite
#   5 bf16 vs fp32 parity of a tiny CoMP-MM training forward          gpu_suite.py parity
# Logs (one per part), statuses and the table go to $OUT if set, else ./gpu_suite_out.
# Environment: PYTHON (default python), GPU_SUITE_BUDGET (seconds for all parts, default 450).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE=0
OUTDIR=${OUT:-$REPO/gpu_suite_out}
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --out) OUTDIR=$2; shift ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (expected --cpu-smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR"/*.status "$OUTDIR"/*.log "$OUTDIR"/zero3.json "$OUTDIR"/suite.json "$OUTDIR"/table.txt
cd "$REPO"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's comp, installed or not
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python}
BUDGET=${GPU_SUITE_BUDGET:-450}
START=$SECONDS
HELPER=benchmarks/gpu_suite.py

# run_part NAME LIMIT RESERVE CMD...: run CMD with output to NAME.log for at most LIMIT seconds,
# keeping RESERVE seconds of the suite's budget for the parts after it (so one slow part
# cannot starve the others); record "rc seconds limit" in NAME.status. `timeout` signals the
# whole process group (torchrun's workers and bench_lm_loss's children included).
run_part() {
  local name=$1 limit=$2 reserve=$3
  shift 3
  local left=$(( BUDGET - (SECONDS - START) - reserve ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    echo "skip skipped: too little of the suite budget (${BUDGET} s) left" > "$OUTDIR/$name.status"
    echo "== $name: skipped, suite budget spent"
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "$rc $(( SECONDS - t0 )) $limit" > "$OUTDIR/$name.status"
  echo "   rc $rc after $(( SECONDS - t0 )) s"
}

skip_part() {  # skip_part NAME REASON
  echo "skip $2" > "$OUTDIR/$1.status"
  echo "== $1: $2"
}

# ---------------------------------------------------------------------------- environment
run_part env 40 0 "$PY" "$HELPER" env
ENV_JSON=$(tail -n 1 "$OUTDIR/env.log" 2>/dev/null || echo "{}")
env_field() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))' "$ENV_JSON" "$1" 2>/dev/null; }
HAS_CUDA=$([[ "$(env_field gpu)" != "None" && -n "$(env_field gpu)" ]] && echo 1 || echo 0)
if (( SMOKE == 0 && HAS_CUDA == 0 )); then
  echo "gpu_suite.sh: no CUDA device visible (env: $ENV_JSON); use --cpu-smoke on a CPU machine" >&2
fi

if (( SMOKE )); then
  DEVICE=cpu
  ENC_FLAGS=(--device cpu --dtype float32 --quick --layers 2)
  ENC_SHAPE="tiny 2 layers"
  LM_TOKENS=1024
  LM_FLAGS=(--device cpu --tokens $LM_TOKENS --vocab 32000 --width 256 --threads 1 --chunk-size 256)
  STEP_FLAGS=(--device cpu --dtype float32 --layers 1 --batch-size 1 --visual-tokens 16 --prompt-tokens 8
              --answer-tokens 16 --steps 1 --warmup 0 --rtol 1e-4 --threads 1)
  STEP_SHAPE="real widths, 1 layer, CPU fp32"
  ZERO3_FLAGS=(--use_cpu True --bf16 False --tf32 False --max_steps 3)
  ZERO3_SHAPE="1 process, CPU fp32, 3 steps"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda
  ENC_FLAGS=(--so400m --device cuda --dtype bfloat16)
  ENC_SHAPE="So400M 27 layers bf16"
  LM_TOKENS=65536
  LM_FLAGS=(--device cuda --tokens $LM_TOKENS --dtype bfloat16 --chunk-size 4096 --repeats 3)
  STEP_FLAGS=(--device cuda --dtype bfloat16)
  STEP_SHAPE="real widths bf16 (So400M + Qwen2.5-0.5B, 16 x 3000 visual tokens)"
  ZERO3_FLAGS=(--bf16 True --tf32 True --max_steps 5)
  ZERO3_SHAPE="1 GPU bf16, 5 steps"
fi
"$PY" -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
  encoder_shape "$ENC_SHAPE" lm_tokens $LM_TOKENS step_shape "$STEP_SHAPE" zero3_shape "$ZERO3_SHAPE" \
  > "$OUTDIR/suite.json"

# ---------------------------------------------------------------------------- 1 encoder
for variant in fwd bwd; do
  extra=(); [[ $variant == bwd ]] && extra=(--backward)
  for backend in flash varlen sdpa; do
    name=encoder_${backend}_${variant}
    if [[ $backend == flash && "$(env_field flash-attn)" == "not installed" ]]; then
      skip_part "$name" "unavailable: flash-attn not installed"
    elif [[ $backend != sdpa && $HAS_CUDA == 0 ]]; then
      skip_part "$name" "needs CUDA ($backend kernels are CUDA-only)"
    elif [[ $backend == varlen && "$(env_field varlen_attn)" != "True" ]]; then
      skip_part "$name" "unavailable: torch.nn.attention.varlen missing in torch $(env_field torch)"
    else
      run_part "$name" 50 280 "$PY" benchmarks/bench_encoder.py "${ENC_FLAGS[@]}" --backend "$backend" "${extra[@]}"
    fi
  done
done

# ---------------------------------------------------------------------------- 2 LM loss
run_part lm_loss 60 230 "$PY" benchmarks/bench_lm_loss.py "${LM_FLAGS[@]}" --methods full,chunked

# ---------------------------------------------------------------------------- 3 Stage II step
# --peak-tflops 989: the script's own MFU line is against the spec peak; the table adds the
# 777 TFLOP/s measured matmul peak from the same achieved TFLOP/s.
run_part train_step 150 140 "$PY" benchmarks/bench_train_step.py --real-widths "${STEP_FLAGS[@]}" --peak-tflops 989

# ---------------------------------------------------------------------------- assets (4, 5)
ASSETS=$OUTDIR/assets
write_assets() {
  set -e
  rm -rf "$ASSETS"
  "$PY" -m comp tiny --out "$ASSETS/qwen2" --kind qwen2
  "$PY" -m comp tiny --out "$ASSETS/siglip" --kind siglip
  "$PY" -m comp data toyworld --out "$ASSETS/toyworld" --size small
  "$PY" -m comp data prior "$ASSETS/toyworld/stage2.yaml" --tokenizer "$ASSETS/qwen2" --out "$ASSETS/word_dist.pt"
}
export -f write_assets
export PY ASSETS
run_part assets 60 100 bash -c write_assets
ASSETS_OK=$([[ -f $ASSETS/word_dist.pt ]] && echo 1 || echo 0)

# ---------------------------------------------------------------------------- 4 ZeRO-3
if [[ "$(env_field deepspeed)" == "not installed" ]]; then
  skip_part zero3 "skipped: deepspeed not installed"
elif (( ! ASSETS_OK )); then
  skip_part zero3 "skipped: tiny assets failed (see assets.log)"
else
  PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # Stage II-a switches (comp_1b_siglip.sh) on the tiny checkpoints: every part trainable,
  # alignment loss with the data's prior, C-RoPE, length-grouped batches, checkpointing.
  run_part zero3 120 30 "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port "$PORT" \
    "$HELPER" zero3-train --result "$OUTDIR/zero3.json" -- \
    --model_name_or_path "$ASSETS/qwen2" --custom_visual_model "$ASSETS/siglip" \
    --data_path "$ASSETS/toyworld/stage2.yaml" --output_dir "$OUTDIR/zero3_run" \
    --deepspeed scripts/zero3.json "${ZERO3_FLAGS[@]}" \
    --mm_tunable_parts mm_vision_tower,mm_mlp_adapter,mm_language_model,mm_lm_head \
    --learning_rate 2e-5 --mm_vision_tower_lr 1e-4 --mm_projector_lr 5e-3 \
    --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --max_num_vistoken 64 \
    --model_max_length 1024 --use_rope 1 --force_resize 128 --use_alignment_loss 1 \
    --word_dist_path "$ASSETS/word_dist.pt" --group_by_modality_length True \
    --gradient_checkpointing True --lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0. \
    --logging_steps 1 --save_strategy no --report_to none --dataloader_num_workers 0 --seed 0
fi

# ---------------------------------------------------------------------------- 5 parity
if (( ! ASSETS_OK )); then
  skip_part parity "skipped: tiny assets failed (see assets.log)"
else
  run_part parity 45 0 "$PY" "$HELPER" parity --assets "$ASSETS" --device "$DEVICE"
fi

# ---------------------------------------------------------------------------- table
echo
echo "gpu_suite ($([[ $SMOKE == 1 ]] && echo "CPU smoke" || echo "GPU")): $(( SECONDS - START )) s; logs in $OUTDIR"
"$PY" "$HELPER" table "$OUTDIR" | tee "$OUTDIR/table.txt"
