"""``comp encode VFM IMAGES... --out FILE.safetensors``: native-resolution encoder features.

Per image i (file stem s) the output holds ``{i}/{s}/tokens`` [h*w, D] in raster order (so
``tokens.view(h, w, D)`` is the patch grid), ``{i}/{s}/pooled`` [D] (their mean) and
``{i}/{s}/grid_thw`` [3]; the metadata names the files, the model and the settings.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from comp.cliargs import ArgumentParser, apply_threads
from comp.data.image import ImageLoadError, load_image
from comp.errors import UserError, ensure_writable_dir
from comp.eval.features import add_budget_flags, budget_text, encode_files, load_encoder
from comp.files import atomic_output, refuse_output_over_input
from comp.models.vision.configuration import POS_ORDERS
from comp.models.weights import save_file

FORMAT = "comp-encode/1"


def feature_tensors(paths: list[Path], tokens: list[torch.Tensor],
                    grid_N3: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output's tensors, keyed ``{index}/{stem}/{tokens|pooled|grid_thw}``."""
    out: dict[str, torch.Tensor] = {}
    for i, (path, tokens_TD) in enumerate(zip(paths, tokens)):
        key = f"{i}/{path.stem}"
        out[f"{key}/tokens"] = tokens_TD.contiguous()
        out[f"{key}/pooled"] = tokens_TD.mean(0)
        out[f"{key}/grid_thw"] = grid_N3[i].clone()
    return out


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="comp encode",
        description="Encode images at native resolution with a vision encoder (HF SigLIP / DINOv2 /\n"
                    "AIMv2 or a CoMP-VFM); write token and pooled features to one .safetensors file.")
    p.add_argument("vfm", help="encoder: directory or Hub id (org/name[@revision])")
    p.add_argument("images", type=Path, nargs="+", help="image files")
    p.add_out("output .safetensors file", type=Path)
    add_budget_flags(p)
    p.add_argument("--batch_tokens", type=int, default=16384,
                   help="encoder tokens per forward pass (images are never split)")
    p.add_switch("--use_rope", default=None, help="2D RoPE on/off; default: the checkpoint's setting")
    p.add_argument("--pos_order", choices=POS_ORDERS, default=None,
                   help="order of the absolute position table: merge, or raster as the reference "
                        "code trained; default: the checkpoint's (raster when detected as "
                        "reference-trained)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:0; default: CUDA when available")
    p.add_threads()
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    start = time.perf_counter()
    try:
        if args.out.is_dir():
            raise UserError("--out is a directory", args.out, "name a .safetensors file")
        refuse_output_over_input(args.out, [args.vfm, *args.images])
        ensure_writable_dir(args.out.parent, "--out directory")
        encoder = load_encoder(args.vfm, use_rope=args.use_rope, resolution=args.resolution,
                               max_num_vistoken=args.max_num_vistoken, device=args.device,
                               pos_order=args.pos_order)
        print(f"comp encode: {budget_text(encoder)}", file=sys.stderr)
        images, bad = usable_images(encoder, args.images)
        for path, why in bad:
            print(f"comp encode: skipping {path}: {why}", file=sys.stderr)
        if not images:
            raise UserError("none of the images can be encoded", args.images[0],
                            "give readable image files")
        tokens, grid_N3 = encode_files(encoder, images, args.batch_tokens, desc="encode")
    except (ImageLoadError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"comp encode: {err}", file=sys.stderr)
        return 2
    args.images = images
    metadata = {"format": FORMAT, "model": str(args.vfm), "order": "raster",
                "files": json.dumps([str(p) for p in args.images]),
                "setting": json.dumps(encoder.setting, sort_keys=True), "budget": budget_text(encoder)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        save_file(feature_tensors(args.images, tokens, grid_N3), tmp, metadata=metadata)

    total = sum(len(t) for t in tokens)
    print(f"comp encode: {len(tokens)} images, {total} tokens of width {tokens[0].shape[1]} in "
          f"{time.perf_counter() - start:.1f} s -> {args.out}")
    if bad:
        print(f"comp encode: {len(bad)} of {len(bad) + len(images)} images skipped: "
              f"{', '.join(str(p) for p, _ in bad)}", file=sys.stderr)
        return 1
    return 0


def usable_images(encoder, paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(images the encoder can take, [(path, why not)]): each is decoded once and sized by the
    processor, so one bad file is named and left out instead of ending the whole run."""
    good, bad = [], []
    for path in paths:
        try:
            image = load_image(path)
            encoder.processor.resized_size(image.height, image.width)
        except (ImageLoadError, ValueError, OSError) as err:
            bad.append((path, str(err)))
        else:
            good.append(path)
    return good, bad
