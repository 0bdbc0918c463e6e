#!/usr/bin/env bash
# CoMP-MM-1B with SigLIP-So400M and Qwen2.5-0.5B: Stage I, II-a, II-b, III, then the trained
# encoder is exported as CoMP-SigLIP. comp_1b_dinov2.sh runs these same stages with DINOv2-L
# (COMP_ENCODER=dinov2). The stages and their flags: src/comp/recipes/comp_1b_siglip.yaml.
# Environment: see scripts/comp/common.sh (COMP_SMOKE=1 runs the same stages on tiny
# checkpoints and toyworld data on one CPU).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
case ${COMP_ENCODER:-siglip} in
  siglip) VISION=${VISION:-$SIGLIP}; RUN=${RUN:-comp_1b_siglip} ;;
  dinov2) VISION=${VISION:-$DINOV2}; RUN=${RUN:-comp_1b_dinov2} ;;
  *) echo "COMP_ENCODER must be siglip or dinov2, got ${COMP_ENCODER}" >&2; exit 2 ;;
esac
VFM_OUT=${COMP_VFM_OUT:-$WORKDIR/$RUN/comp-vfm}

run_recipe comp_1b_siglip
