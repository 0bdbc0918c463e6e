#!/usr/bin/env bash
# CoMP-MM-1B from an already trained CoMP-SigLIP (the encoder exported by comp_1b_siglip.sh):
# Stage I (rope on, no alignment loss, native resolution), one native Stage II, Stage III.
# The stages and their flags: src/comp/recipes/comp_1b_comp_siglip.yaml.
# Environment: see scripts/comp/common.sh; COMP_SIGLIP names the CoMP-VFM directory
# or its Hub id org/name[@revision] (default: the export of comp_1b_siglip.sh in the same
# COMP_WORKDIR).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RUN=${RUN:-comp_1b_comp_siglip}
VISION=${COMP_SIGLIP:-$WORKDIR/comp_1b_siglip/comp-vfm}
HUB_ID='^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(@.+)?$'
if [[ ! -f $VISION/config.json && ! $VISION =~ $HUB_ID ]]; then
  echo "no CoMP-SigLIP at $VISION: run scripts/comp/comp_1b_siglip.sh first or set COMP_SIGLIP" >&2
  exit 2
fi

run_recipe comp_1b_comp_siglip
