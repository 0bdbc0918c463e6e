"""``comp export-vfm CKPT --out OUT``: the trained encoder of a CoMP-MM checkpoint as a standalone
CoMP-VFM directory (config.json, model.safetensors, preprocessor_config.json).

The result loads with ``CompVisionModel.from_pretrained`` (or ``AutoModel.from_pretrained``
after ``import comp``) and works as ``--custom_visual_model`` (the third seed script starts
from it). The merger belongs to the MLLM and is left out unless ``--keep_merger``. With
``--standalone`` the directory also holds the modeling code (comp.models.vision.standalone),
so plain transformers loads it: ``AutoModel.from_pretrained(dir, trust_remote_code=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path

from comp.cliargs import ArgumentParser
from comp.errors import UserError
from comp.files import atomic_output, refuse_output_over_input
from comp.hub import resolve_model_dir
from comp.models.kinds import load_comp_mm

from comp.models.vision.model import CompVisionModel
from comp.models.vision.standalone import add_modeling_code

PREPROCESSOR = "preprocessor_config.json"


def export_vfm(checkpoint: str | Path, out: str | Path, *, keep_merger: bool = False,
               standalone: bool = False) -> Path:
    checkpoint, out = resolve_model_dir(checkpoint), Path(out)
    model = load_comp_mm(checkpoint)  # its kind checked; no tensor left random or non-finite
    refuse_output_over_input(out, [checkpoint])
    visual: CompVisionModel = model.visual
    if not keep_merger:
        visual.merger = None
        visual.config.w_merger = None
    preprocessor = checkpoint / PREPROCESSOR
    if not preprocessor.exists():
        raise UserError(f"no {PREPROCESSOR}", checkpoint, "export from a directory written by "
                        "`comp train` (model and processor together)")
    visual.preprocessor_config = json.loads(preprocessor.read_text())
    with atomic_output(out, directory=True) as tmp:  # a failure leaves no half-written directory
        visual.save_pretrained(tmp)
        if standalone:
            add_modeling_code(tmp)
    return out


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="comp export-vfm", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a CoMP-MM (a `comp train` output_dir): directory or Hub id")
    parser.add_out("where to write the CoMP-VFM directory")
    parser.add_switch("--keep_merger", default=False, help="also export the 2x2 merger")
    parser.add_switch("--standalone", default=False,
                      help="also write the modeling code, so transformers loads the directory "
                           "without comp (AutoModel, trust_remote_code=True)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = export_vfm(args.checkpoint, args.out, keep_merger=args.keep_merger, standalone=args.standalone)
    print(f"wrote CoMP-VFM to {path}")
    return 0
