#!/usr/bin/env bash
# CoMP-MM-1B from an already trained CoMP-SigLIP (the encoder exported by comp_1b_siglip.sh):
# Stage I (rope on, no alignment loss, native resolution), one native Stage II, Stage III.
# Environment: see scripts/comp/common.sh; COMP_SIGLIP names the CoMP-VFM directory
# or its Hub id org/name[@revision] (default: the export of comp_1b_siglip.sh in the same
# COMP_WORKDIR).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RUN=${RUN:-comp_1b_comp_siglip}
VISION=${COMP_SIGLIP:-$WORKDIR/comp_1b_siglip/comp-vfm}
ALL=mm_vision_tower,mm_mlp_adapter,mm_language_model,mm_lm_head
HUB_ID='^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(@.+)?$'
if [[ ! -f $VISION/config.json && ! $VISION =~ $HUB_ID ]]; then
  echo "no CoMP-SigLIP at $VISION: run scripts/comp/comp_1b_siglip.sh first or set COMP_SIGLIP" >&2
  exit 2
fi

run_step stage1 "$STAGE1_DATA" --model_name_or_path "$LLM_VERSION" --custom_visual_model "$VISION" \
    --mm_tunable_parts mm_mlp_adapter --learning_rate 1e-3 \
    --per_device_train_batch_size "$(scale_batch 32)" --gradient_accumulation_steps 1 \
    --max_num_vistoken "$(scale_tokens 1024)" --model_max_length "$(scale_length 4096)" \
    --use_rope 1 --use_alignment_loss 0

run_step stage2 "$STAGE2_DATA" --model_name_or_path "$WORKDIR/$RUN/stage1" \
    --mm_tunable_parts "$ALL" --learning_rate 2e-5 --mm_vision_tower_lr 1e-4 --mm_projector_lr 5e-3 \
    --per_device_train_batch_size "$(scale_batch 16)" --gradient_accumulation_steps 2 \
    --max_num_vistoken "$(scale_tokens 3000)" --model_max_length "$(scale_length 8000)" \
    --use_rope 1 --use_alignment_loss 0

run_step stage3 "$STAGE3_DATA" --model_name_or_path "$WORKDIR/$RUN/stage2" \
    --mm_tunable_parts "$ALL" --learning_rate 1e-5 --mm_vision_tower_lr 5e-6 \
    --per_device_train_batch_size "$(scale_batch 16)" --gradient_accumulation_steps 1 \
    --max_num_vistoken "$(scale_tokens 3000)" --model_max_length "$(scale_length 4096)" \
    --use_rope 1 --use_alignment_loss 0
