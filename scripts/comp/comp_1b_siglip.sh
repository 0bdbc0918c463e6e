#!/usr/bin/env bash
# CoMP-MM-1B with SigLIP-So400M and Qwen2.5-0.5B: Stage I, II-a, II-b, III, then the trained
# encoder is exported as CoMP-SigLIP. comp_1b_dinov2.sh runs these same steps with DINOv2-L
# (COMP_ENCODER=dinov2). Environment: see scripts/comp/common.sh (COMP_SMOKE=1 runs the same
# steps on tiny checkpoints and toyworld data on one CPU).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
case ${COMP_ENCODER:-siglip} in
  siglip) VISION=${VISION:-$SIGLIP}; RUN=${RUN:-comp_1b_siglip} ;;
  dinov2) VISION=${VISION:-$DINOV2}; RUN=${RUN:-comp_1b_dinov2} ;;
  *) echo "COMP_ENCODER must be siglip or dinov2, got ${COMP_ENCODER}" >&2; exit 2 ;;
esac
ALL=mm_vision_tower,mm_mlp_adapter,mm_language_model,mm_lm_head

run_step stage1 "$STAGE1_DATA" --model_name_or_path "$LLM_VERSION" --custom_visual_model "$VISION" \
    --mm_tunable_parts mm_mlp_adapter --learning_rate 1e-3 \
    --per_device_train_batch_size "$(scale_batch 32)" --gradient_accumulation_steps 1 \
    --max_num_vistoken "$(scale_tokens 1024)" --model_max_length "$(scale_length 4096)" \
    --use_rope 0 --force_resize "$(scale_resize 384)" --use_alignment_loss 1

run_step stage2a "$STAGE2_DATA" --model_name_or_path "$WORKDIR/$RUN/stage1" \
    --mm_tunable_parts "$ALL" --learning_rate 2e-5 --mm_vision_tower_lr 1e-4 --mm_projector_lr 5e-3 \
    --per_device_train_batch_size "$(scale_batch 16)" --gradient_accumulation_steps 2 \
    --max_num_vistoken "$(scale_tokens 3000)" --model_max_length "$(scale_length 8000)" \
    --use_rope 1 --force_resize "$(scale_resize 1024)" --use_alignment_loss 1

run_step stage2b "$STAGE2_DATA" --model_name_or_path "$WORKDIR/$RUN/stage2a" \
    --mm_tunable_parts "$ALL" --learning_rate 2e-5 --mm_vision_tower_lr 1e-4 --mm_projector_lr 5e-3 \
    --per_device_train_batch_size "$(scale_batch 16)" --gradient_accumulation_steps 2 \
    --max_num_vistoken "$(scale_tokens 3000)" --model_max_length "$(scale_length 8000)" \
    --use_rope 1 --use_alignment_loss 1

run_step stage3 "$STAGE3_DATA" --model_name_or_path "$WORKDIR/$RUN/stage2b" \
    --mm_tunable_parts "$ALL" --learning_rate 1e-5 --mm_vision_tower_lr 2e-5 \
    --per_device_train_batch_size "$(scale_batch 16)" --gradient_accumulation_steps 1 \
    --max_num_vistoken "$(scale_tokens 3000)" --model_max_length "$(scale_length 4096)" \
    --use_rope 1 --use_alignment_loss 0

export_vfm stage3 "${COMP_VFM_OUT:-$WORKDIR/$RUN/comp-vfm}"
