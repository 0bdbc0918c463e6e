"""Images/s of CompImageProcessor vs transformers' Qwen2VLImageProcessorPil (temporal patch 1)
on scikit-image's sample photos, one call per image as a data loader makes them, at CoMP's
Stage-I budget (max 1024 visual tokens, SigLIP normalisation). Outputs are checked to be
identical (same grids, pixel values within 1e-4) before anything is timed.

    python benchmarks/bench_processor.py [--quick] [--max-num-vistoken 1024]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from comp.data.image import CompImageProcessor

TOKEN_PIXELS = 14 * 14 * 4
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def load_photos() -> list[Image.Image]:
    import skimage.data

    photos = []
    for path in sorted(Path(skimage.data.data_dir).glob("*")):
        if path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                image.load()
                photos.append(image)
    return photos


def check_identical(baseline, ours, photos: list[Image.Image]) -> float:
    worst = 0.0
    for image in photos:
        expected, actual = baseline(image, return_tensors="pt"), ours(image)
        if not torch.equal(expected["image_grid_thw"], actual["image_grid_thw"]):
            raise SystemExit(f"grid differs on a {image.mode} {image.size} photo")
        worst = max(worst, (expected["pixel_values"] - actual["pixel_values"]).abs().max().item())
    if worst > 1e-4:
        raise SystemExit(f"pixel values differ by {worst}")
    return worst


def seconds_per_pass(process, photos: list[Image.Image]) -> tuple[float, float]:
    """(wall, CPU) seconds for one pass over the photos. Both processors are single-threaded,
    so CPU time is the fair measure on a shared machine, wall time the plain one."""
    wall, cpu = time.perf_counter(), time.process_time()
    for image in photos:
        process(image)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timing rounds instead of 10")
    parser.add_argument("--max-num-vistoken", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)

    photos = load_photos()
    baseline = Qwen2VLImageProcessorPil(
        temporal_patch_size=1, min_pixels=TOKEN_PIXELS * 4, max_pixels=TOKEN_PIXELS * args.max_num_vistoken,
        image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    ours = CompImageProcessor(max_num_vistoken=args.max_num_vistoken, image_mean=SIGLIP_MEAN,
                              image_std=SIGLIP_STD)
    worst = check_identical(baseline, ours, photos)
    modes = sorted({image.mode for image in photos})
    print(f"{len(photos)} scikit-image photos ({'/'.join(modes)}), max {args.max_num_vistoken} visual "
          f"tokens: identical grids, max |pixel difference| {worst:.1e}")

    rounds = 3 if args.quick else 10
    best = {"baseline": [float("inf")] * 2, "ours": [float("inf")] * 2}
    for _ in range(rounds):  # interleaved, best of the rounds: the least disturbed pass
        for name, process in (("baseline", lambda im: baseline(im, return_tensors="pt")), ("ours", ours)):
            best[name] = [min(a, b) for a, b in zip(best[name], seconds_per_pass(process, photos))]
    (wall_base, cpu_base), (wall_ours, cpu_ours) = best["baseline"], best["ours"]
    n = len(photos)
    print(f"{'images/s':26s} {'wall':>8s} {'CPU':>8s}")
    print(f"{'Qwen2VLImageProcessorPil':26s} {n / wall_base:8.1f} {n / cpu_base:8.1f}")
    print(f"{'CompImageProcessor':26s} {n / wall_ours:8.1f} {n / cpu_ours:8.1f}")
    print(f"{'ratio':26s} {wall_base / wall_ours:7.2f}x {cpu_base / cpu_ours:7.2f}x")

if __name__ == "__main__":
    main()
