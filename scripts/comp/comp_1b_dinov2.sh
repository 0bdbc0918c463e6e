#!/usr/bin/env bash
# CoMP-MM-1B with DINOv2-L and Qwen2.5-0.5B: the reference runs the SigLIP recipe's four steps
# with the same flags and only the encoder changed, so this runs comp_1b_siglip.sh with
# COMP_ENCODER=dinov2 (outputs in $COMP_WORKDIR/comp_1b_dinov2, encoder exported as comp-vfm).
COMP_ENCODER=dinov2 exec bash "$(dirname "${BASH_SOURCE[0]}")/comp_1b_siglip.sh" "$@"
