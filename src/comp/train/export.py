"""``comp export-vfm CKPT OUT``: the trained encoder of a CoMP-MM checkpoint as a standalone
CoMP-VFM directory (config.json, model.safetensors, preprocessor_config.json).

The result loads with ``CompVisionModel.from_pretrained`` and works as
``--custom_visual_model`` (the third seed script starts from it). The merger belongs to the
MLLM and is left out unless ``--keep_merger``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from comp.models.mllm import CompForConditionalGeneration
from comp.models.vision.model import CompVisionModel

PREPROCESSOR = "preprocessor_config.json"


def export_vfm(checkpoint: str | Path, out: str | Path, *, keep_merger: bool = False) -> Path:
    checkpoint, out = Path(checkpoint), Path(out)
    model = CompForConditionalGeneration.from_pretrained(checkpoint)
    visual: CompVisionModel = model.visual
    if not keep_merger:
        visual.merger = None
        visual.config.w_merger = None
    preprocessor = checkpoint / PREPROCESSOR
    if not preprocessor.exists():
        raise FileNotFoundError(f"{checkpoint}: no {PREPROCESSOR}; export from a directory written by "
                                "`comp train` (model and processor together)")
    visual.preprocessor_config = json.loads(preprocessor.read_text())
    return visual.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comp export-vfm", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a CoMP-MM directory (a `comp train` output_dir)")
    parser.add_argument("out", help="where to write the CoMP-VFM")
    parser.add_argument("--keep_merger", action="store_true", help="also export the 2x2 merger")
    args = parser.parse_args(argv)
    path = export_vfm(args.checkpoint, args.out, keep_merger=args.keep_merger)
    print(f"wrote CoMP-VFM to {path}")
    return 0
