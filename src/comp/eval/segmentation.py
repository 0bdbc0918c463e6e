"""``comp probe VFM --task segmentation``: a linear head on every frozen patch token.

DINOv2's linear protocol on ADE20K: each patch token goes through one linear layer (a 1x1
convolution, after standardising with the training tokens' statistics), the logits are
upsampled (bilinear) to the label map's size, and the head is trained with cross-entropy
that ignores label 0; val is scored by mIoU over classes, pixel accuracy and per-class IoU.
A class absent from both the predictions and the ground truth of val has no IoU and stays
out of the mean (the report names such classes). The lr / wd sweep, AdamW training and
flags are ``probe``'s; the held-out part of the sweep is a share of the training images.

Layout (ADEChallengeData2016's)::

    DIR/images[/SPLIT]/<stem>.jpg|png|...
    DIR/annotations[/SPLIT]/<stem>.png    label map, mode L or P: 0 = ignore, 1..K = classes

Images and label maps pair by file stem. Class names, when found: ``classes.json`` (a list,
names of labels 1..K, as toyworld writes) or ADE's ``objectInfo150.txt``, in DIR or its parent.

Sizes at which val is scored (the output names those that ran):
- fixed: every image squeezed to N x N first (the encoder's square training size), as a
  fixed-resolution encoder sees it; the head is trained on train at that size;
- native: each image at its own aspect, scaled into the token budget (smart_resize);
- sliding: an image larger than the budget at its own size (rounded to the 28 px grid) is
  cut into overlapping windows of the budget's size and their logits averaged; images that
  fit are scored as at native. Uses the native head; skipped when no val image is larger.

Shape legend: N images, B a batch, T patch tokens (of an image or a batch), D encoder width,
K classes, h x w an image's patch grid, H x W pixels (of a label map or a canvas).
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm.auto import tqdm

from comp.data.image import IMAGE_SUFFIXES, image_size, load_image, smart_resize, to_rgb_or_gray
from comp.errors import UserError
from comp.eval.features import Encoder, at_resolution, budget_text, cached_features, encode_files
from comp.eval.heads import LinearProbe, TrainSettings, fit, select_setting

IGNORE = 255  # label of ignored pixels after mapping (raw 0); classes are 0..K-1
SIZES = ("fixed", "native", "sliding")
LAYOUT_FIX = ("point --train / --val at a directory holding images/ and annotations/ (ADE20K "
              "layout), or at the ADEChallengeData2016 root with --train_split training "
              "--val_split validation")


# ----------------------------------------------------------------------------- data


def read_split(root: str | Path, split: str | None = None) -> tuple[list[Path], list[Path]]:
    """(images, their label maps), sorted by stem, from ``root/images[/split]`` and
    ``root/annotations[/split]``; an image without a label map is an error naming it."""
    root = Path(root)
    image_dir, ann_dir = (root / sub / split if split else root / sub for sub in ("images", "annotations"))
    for folder in (image_dir, ann_dir):
        if not folder.is_dir():
            raise UserError(f"no {folder.name if split is None else folder.parent.name + '/' + split} "
                            "folder", folder, LAYOUT_FIX)
    images = sorted(f for f in image_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)})", image_dir, LAYOUT_FIX)
    by_stem = {f.stem: f for f in ann_dir.iterdir() if f.suffix.lower() == ".png"}
    annotations = []
    for image in images:
        if image.stem not in by_stem:
            raise UserError("image without annotation", image,
                            f"add its label map {ann_dir / (image.stem + '.png')} or remove the image")
        annotations.append(by_stem[image.stem])
    return images, annotations


def map_labels(raw_HW: torch.Tensor) -> torch.Tensor:
    """ADE20K label values -> training labels: 0 (unlabelled) -> IGNORE, k -> k - 1."""
    return torch.where(raw_HW == 0, IGNORE, raw_HW.long() - 1).to(torch.uint8)


def load_labels(images: list[Path], annotations: list[Path]) -> list[torch.Tensor]:
    """Each label map as uint8 [H, W] after ``map_labels``, checked against its image's size
    (read from the image header)."""
    labels = []
    for image, ann in zip(images, annotations):
        try:
            with Image.open(ann) as im:
                if im.mode not in ("L", "P"):
                    raise UserError(f"label map of mode {im.mode}, not L or P (one class id per pixel)",
                                    ann, "save it as an 8-bit grey or palette PNG")
                raw_HW = np.array(im)
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"cannot read the label map ({err})", ann, "replace the file") from None
        height, width = image_size(image)
        if raw_HW.shape != (height, width):
            raise UserError(f"label map of {raw_HW.shape[1]}x{raw_HW.shape[0]} px for an image of "
                            f"{width}x{height} px", ann, f"use the label map made for {image.name}")
        labels.append(map_labels(torch.from_numpy(raw_HW)))
    return labels


def read_class_names(*roots: Path) -> list[str] | None:
    """Names of labels 1..K from ``classes.json`` or ADE's ``objectInfo150.txt`` (its last,
    tab-separated column; the first of the synonyms) in a root or its parent."""
    for root in roots:
        for folder in (root, root.parent):
            if (folder / "classes.json").is_file():
                return [str(n) for n in json.loads((folder / "classes.json").read_text())]
            if (folder / "objectInfo150.txt").is_file():
                with open(folder / "objectInfo150.txt", newline="") as f:
                    rows = list(csv.reader(f, delimiter="\t"))[1:]
                return [row[-1].split(",")[0].strip() for row in rows if row]
    return None


def num_classes_of(labels: list[torch.Tensor], names: list[str] | None, where: str) -> int:
    """K: the names' count, else the largest label value found."""
    top = max(int(y[y != IGNORE].max()) if (y != IGNORE).any() else -1 for y in labels) + 1
    if names is None:
        if top == 0:
            raise UserError("every label map is 0 (ignore) everywhere", where, "check the annotations")
        return top
    if top > len(names):
        raise UserError(f"label value {top} above the {len(names)} named classes", where,
                        "fix the label maps or classes.json")
    return len(names)


# ----------------------------------------------------------------------------- tokens -> pixels


def token_grid(tokens_TD: torch.Tensor, grid_3: torch.Tensor) -> torch.Tensor:
    """An image's tokens in raster order (as ``features.encode_files`` returns them, after
    ``to_raster`` undid the 2x2 merge-window packing) -> x_hwD."""
    _, h, w = (int(v) for v in grid_3)
    if len(tokens_TD) != h * w:
        raise ValueError(f"{len(tokens_TD)} tokens for a {h}x{w} patch grid")
    return tokens_TD.view(h, w, -1)


def upsample_logits(logits_TK: torch.Tensor, grid_3: torch.Tensor, size_HW: tuple[int, int]) -> torch.Tensor:
    """Per-token logits (raster order) -> logits_KHW, bilinear (half-pixel centres): the
    patch grid covers the whole resized image, so stretching it to the label map's size
    undoes the resize (squeeze or smart_resize) exactly."""
    grid_1Khw = token_grid(logits_TK, grid_3).permute(2, 0, 1)[None]
    return nn.functional.interpolate(grid_1Khw, size=tuple(size_HW), mode="bilinear", align_corners=False)[0]


def pixel_loss(logits_TK: torch.Tensor, grid_B3: torch.Tensor, labels: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over every labelled pixel of a batch (ignored ones excluded), each
    image's logits upsampled to its label map; a batch with no labelled pixel gives 0."""
    total, count = logits_TK.new_zeros(()), 0
    for logits, grid_3, y_HW in zip(torch.split(logits_TK, grid_B3.prod(-1).tolist()), grid_B3, labels):
        y_HW = y_HW.to(logits.device).long()
        total = total + nn.functional.cross_entropy(upsample_logits(logits, grid_3, y_HW.shape)[None],
                                                    y_HW[None], ignore_index=IGNORE, reduction="sum")
        count += int((y_HW != IGNORE).sum())
    return total / max(count, 1)


# ----------------------------------------------------------------------------- metric


def confusion(pred_HW: torch.Tensor, label_HW: torch.Tensor, num_classes: int) -> torch.Tensor:
    """conf_KK[true, predicted] pixel counts; ignored pixels are not counted."""
    keep = label_HW != IGNORE
    index = label_HW[keep].long() * num_classes + pred_HW[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def scores(conf_KK: torch.Tensor, names: list[str]) -> dict:
    """mIoU, pixel accuracy and per-class IoU of a confusion matrix. IoU_k = TP / (TP + FP +
    FN); a class with TP + FP + FN = 0 (absent from truth and prediction) has none (null)
    and is left out of the mean, and listed. No labelled pixel at all: mIoU 0."""
    conf_KK = conf_KK.double()
    tp_K = conf_KK.diag()
    union_K = conf_KK.sum(0) + conf_KK.sum(1) - tp_K
    present_K = union_K > 0
    iou_K = tp_K / union_K.clamp_min(1)
    total = float(conf_KK.sum())
    return {"miou": float(iou_K[present_K].mean()) if present_K.any() else 0.0,
            "pixel_acc": float(tp_K.sum()) / total if total else 0.0,
            "iou": {name: float(iou_K[k]) if present_K[k] else None for k, name in enumerate(names)},
            "classes_in_mean": int(present_K.sum()),
            "absent_classes": [name for k, name in enumerate(names) if not present_K[k]]}


# ----------------------------------------------------------------------------- head


def _token_batch(inputs, index_B):
    tokens, device = inputs
    return (torch.cat([tokens[i] for i in index_B.tolist()]).to(device),)


def train_head(tokens: list[torch.Tensor], grid_N3: torch.Tensor, labels: list[torch.Tensor],
               num_classes: int, settings: TrainSettings, device: str = "cpu") -> LinearProbe:
    """``probe.LinearProbe`` (train-standardised linear layer) on every token, trained by
    ``probe.fit`` against the upsampled per-pixel loss on ``device`` (full-size logits of
    150 ADE20K classes want a GPU; the features stay on the CPU, a batch at a time moves)."""
    torch.manual_seed(settings.seed)
    x_TD = torch.cat(tokens)
    head = LinearProbe(x_TD.mean(0), x_TD.std(0, unbiased=False), num_classes).to(device)

    def loss_fn(logits_TK, index_B):
        return pixel_loss(logits_TK, grid_N3[index_B], [labels[i] for i in index_B.tolist()])

    return fit(head, (tokens, device), labels, settings, _token_batch, loss_fn)


def _head_device(head: nn.Module) -> torch.device:
    return next(head.parameters()).device


@torch.no_grad()
def evaluate(head: nn.Module, tokens: list[torch.Tensor], grid_N3: torch.Tensor,
             labels: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """conf_KK of the head's upsampled per-pixel argmax over these images (on the head's device)."""
    device = _head_device(head)
    conf_KK = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for x_TD, grid_3, y_HW in zip(tokens, grid_N3, labels):
        logits_KHW = upsample_logits(head(x_TD.to(device)), grid_3, y_HW.shape)
        # max(0).indices: the same first-maximum index as argmax(0), ~9x faster over dim 0 on the CPU
        conf_KK += confusion(logits_KHW.max(0).indices, y_HW.to(device), num_classes)
    return conf_KK.cpu()


def select_and_train(tokens, grid_N3, labels, num_classes: int, settings: TrainSettings, lrs, wds,
                     holdout: float, desc: str = "", device: str = "cpu") -> tuple[LinearProbe, dict]:
    """``probe.select_setting`` over lrs x wds (held-out mIoU on a share of the training
    images), then the head retrained on all of them with the winner."""
    def fit_predict(fit_idx, held_idx, s):
        pick = fit_idx.tolist()
        head = train_head([tokens[i] for i in pick], grid_N3[fit_idx], [labels[i] for i in pick], num_classes, s,
                          device)
        held = held_idx.tolist()
        return evaluate(head, [tokens[i] for i in held], grid_N3[held_idx], [labels[i] for i in held], num_classes)

    chosen, sweep = select_setting(fit_predict, torch.zeros(len(tokens), dtype=torch.long), settings, lrs, wds,
                                   holdout, desc, score=lambda conf, _: scores(conf, [""] * num_classes)["miou"],
                                   metric="heldout_miou")
    head = train_head(tokens, grid_N3, labels, num_classes, chosen, device)
    return head, {"lr": chosen.lr, "wd": chosen.wd, **({"sweep": sweep} if sweep else {})}


# ----------------------------------------------------------------------------- sliding window


def canvas_size(encoder: Encoder, height: int, width: int) -> tuple[int, int]:
    """An image's own size on the patch-merge grid (multiples of 28 px), no budget applied."""
    proc = encoder.processor
    return smart_resize(height, width, proc.patch_size * proc.merge_size, proc.min_pixels, sys.maxsize)


def exceeds_budget(encoder: Encoder, path: Path) -> bool:
    height, width = canvas_size(encoder, *image_size(path))
    return height * width > encoder.processor.max_pixels


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Evenly spread starts of windows covering [0, length), neighbours overlapping by at
    least ``overlap`` of a window."""
    if window >= length:
        return [0]
    stride = max(1, math.floor(window * (1 - overlap)))
    n = math.ceil((length - window) / stride) + 1
    return sorted({round(i * (length - window) / (n - 1)) for i in range(n)})


def sliding_windows(height: int, width: int, max_pixels: int, factor: int,
                    overlap: float) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of windows within the budget (sides multiples of ``factor``, square
    where the canvas allows, else as long as the budget allows) covering a canvas."""
    side = max(factor, math.isqrt(max_pixels) // factor * factor)
    win_h = min(height, side)
    win_w = min(width, max(factor, max_pixels // win_h // factor * factor))
    win_h = min(height, max(factor, max_pixels // win_w // factor * factor))
    return [(top, left, win_h, win_w) for top in window_starts(height, win_h, overlap)
            for left in window_starts(width, win_w, overlap)]


@torch.no_grad()
def sliding_logits(encoder: Encoder, head: nn.Module, path: Path, num_classes: int, overlap: float,
                   batch_tokens: int = 16384) -> tuple[torch.Tensor, int]:
    """(logits_KHW on the image's canvas, windows used): each window goes through the
    encoder within the budget, its logits upsampled to the window's pixels, overlaps averaged."""
    proc = encoder.processor
    image = to_rgb_or_gray(load_image(path))  # as the processor converts before resizing
    height, width = canvas_size(encoder, image.height, image.width)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling(proc.resample))
    boxes = sliding_windows(height, width, proc.max_pixels, proc.patch_size * proc.merge_size, overlap)
    crops = [image.crop((left, top, left + w, top + h)) for top, left, h, w in boxes]
    tokens, grid_N3 = encode_files(encoder, crops, batch_tokens)
    device = _head_device(head)
    sum_KHW = torch.zeros(num_classes, height, width, device=device)
    count_HW = torch.zeros(height, width, device=device)
    for (top, left, h, w), x_TD, grid_3 in zip(boxes, tokens, grid_N3):
        sum_KHW[:, top:top + h, left:left + w] += upsample_logits(head(x_TD.to(device)), grid_3, (h, w))
        count_HW[top:top + h, left:left + w] += 1
    return sum_KHW / count_HW, len(boxes)


@torch.no_grad()
def evaluate_sliding(encoder: Encoder, head: nn.Module, paths: list[Path], native_tokens: list[torch.Tensor],
                     native_grid_N3: torch.Tensor, labels: list[torch.Tensor], num_classes: int,
                     overlap: float, batch_tokens: int = 16384) -> tuple[torch.Tensor, int, int]:
    """(conf_KK, images windowed, windows): images over the budget by sliding windows, the
    rest from their native tokens (the same pixels: they fit whole)."""
    device = _head_device(head)
    conf_KK = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    windowed = windows = 0
    for path, x_TD, grid_3, y_HW in tqdm(list(zip(paths, native_tokens, native_grid_N3, labels)),
                                          desc="sliding windows", unit="img", disable=None, leave=False):
        if exceeds_budget(encoder, path):
            canvas_KHW, n = sliding_logits(encoder, head, path, num_classes, overlap, batch_tokens)
            logits_KHW = nn.functional.interpolate(canvas_KHW[None], size=tuple(y_HW.shape), mode="bilinear",
                                                   align_corners=False)[0]
            windowed, windows = windowed + 1, windows + n
        else:
            logits_KHW = upsample_logits(head(x_TD.to(device)), grid_3, y_HW.shape)
        # max(0).indices: the same first-maximum index as argmax(0), ~9x faster over dim 0 on the CPU
        conf_KK += confusion(logits_KHW.max(0).indices, y_HW.to(device), num_classes)
    return conf_KK.cpu(), windowed, windows


# ----------------------------------------------------------------------------- the probe


def fixed_size_of(encoder: Encoder) -> int:
    """The encoder's square training size: a saved CoMP processor's ``force_resize``, else
    the config's ``image_size``."""
    from comp.data.image import CompImageProcessor

    try:
        stored = CompImageProcessor.from_pretrained(encoder.source).force_resize
    except ValueError:
        stored = None
    return stored or int(encoder.model.config.image_size)


def run_segmentation(encoder: Encoder, train: tuple[list[Path], list[torch.Tensor]],
                     val: tuple[list[Path], list[torch.Tensor]], names: list[str], settings: TrainSettings, *,
                     sizes=SIZES, fixed_size: int | None = None, lrs=None, wds=None, holdout: float = 0.2,
                     cache: Path | None = None, batch_tokens: int = 16384, overlap: float = 1 / 3) -> dict:
    """Results per size in ``sizes`` that applies, and the reasons for those skipped.
    ``encoder`` is the native one (its budget bounds every size); ``fixed_size`` None: the
    encoder's training size. The head trains where the encoder runs."""
    (train_paths, train_labels), (val_paths, val_labels) = train, val
    device = str(encoder.model.device)
    if "sliding" in sizes and "native" not in sizes:
        raise ValueError("--sizes sliding needs native too (the windows use the native head)")
    num_classes = len(names)
    lrs = [settings.lr] if lrs is None else list(lrs)
    wds = [settings.wd] if wds is None else list(wds)
    fixed_size = fixed_size or fixed_size_of(encoder)
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    heads: dict[str, nn.Module] = {}
    native_val = None
    for size in sizes:
        if size == "sliding":
            over = sum(exceeds_budget(encoder, p) for p in val_paths)
            if not over:
                skipped[size] = f"no val image exceeds the budget of {encoder.setting['max_num_vistoken']} tokens"
                continue
            conf_KK, windowed, windows = evaluate_sliding(encoder, heads["native"], val_paths, *native_val,
                                                          val_labels, num_classes, overlap, batch_tokens)
            results[size] = {**scores(conf_KK, names), "pixels": f"images over the budget cut into windows "
                             f"of at most {encoder.processor.max_pixels} px, overlap {overlap:.2f}, "
                             "logits averaged; the others whole", "images_windowed": windowed,
                             "windows": windows, "head": "native's"}
            continue
        enc = at_resolution(encoder, fixed_size) if size == "fixed" else encoder
        train_tokens, train_grid = cached_features(enc, train_paths, cache, batch_tokens, desc=f"encode train ({size})")
        val_tokens, val_grid = cached_features(enc, val_paths, cache, batch_tokens, desc=f"encode val ({size})")
        if size == "native":
            native_val = (val_tokens, val_grid)
        heads[size], chosen = select_and_train(train_tokens, train_grid, train_labels, num_classes, settings,
                                               lrs, wds, holdout, f"{size} sweep", device)
        conf_KK = evaluate(heads[size], val_tokens, val_grid, val_labels, num_classes)
        pixels = (f"every image squeezed to {fixed_size}x{fixed_size} first" if size == "fixed"
                  else "each image at its own aspect within the budget")
        results[size] = {**scores(conf_KK, names), "pixels": pixels, **chosen,
                         "tokens_per_image": round(sum(len(t) for t in val_tokens) / len(val_tokens), 1)}
    return {"sizes_run": list(results), "sizes_skipped": skipped, "fixed_size": fixed_size, "results": results}


def main(args, encoder: Encoder, settings: TrainSettings) -> dict:
    """The CLI's segmentation branch (``probe.main`` parses and handles errors): reads the
    splits, runs the probe, prints one line per size; returns the report."""
    if args.max_train_images is not None and args.max_train_images < 1:
        raise ValueError(f"--max_train_images must be at least 1, got {args.max_train_images}")
    train_images, train_anns = read_split(args.train, args.train_split)
    val_images, val_anns = read_split(args.val, args.val_split)
    if args.max_train_images is not None and args.max_train_images < len(train_images):
        keep = np.linspace(0, len(train_images) - 1, args.max_train_images).round().astype(int)
        train_images, train_anns = [train_images[i] for i in keep], [train_anns[i] for i in keep]
    train_labels = load_labels(train_images, train_anns)
    val_labels = load_labels(val_images, val_anns)
    names = read_class_names(args.train, args.val)
    k = num_classes_of(train_labels + val_labels, names, str(args.train))
    names = names or [str(v) for v in range(1, k + 1)]
    print(f"comp probe: segmentation, {k} classes, {len(train_images)} train / {len(val_images)} val "
          f"images; {budget_text(encoder)}", file=sys.stderr)
    out = run_segmentation(encoder, (train_images, train_labels), (val_images, val_labels), names, settings,
                           sizes=args.sizes, fixed_size=args.resolution, lrs=args.lr, wds=args.wd,
                           holdout=args.holdout, cache=args.cache, batch_tokens=args.batch_tokens,
                           overlap=args.overlap)
    for size, res in out["results"].items():
        chosen = f"  (lr {res['lr']:g}, wd {res['wd']:g})" if "lr" in res else ""
        print(f"{size:>8}  mIoU {100 * res['miou']:.2f}  pixel acc {100 * res['pixel_acc']:.2f}  "
              f"({res['classes_in_mean']}/{k} classes){chosen}")
    for size, why in out["sizes_skipped"].items():
        print(f"{size:>8}  skipped: {why}")
    return {"task": "segmentation", "model": str(args.vfm), "train": str(args.train), "val": str(args.val),
            "train_split": args.train_split, "val_split": args.val_split, "budget": budget_text(encoder),
            "encoder": encoder.setting, "classes": names, "num_classes": k,
            "labels": "label 0 = ignore (excluded from loss and metric); label k = class k-1",
            "miou_note": "mean over the classes present in val's ground truth or predictions; "
                         "absent_classes (per size) are left out",
            "n_train": len(train_images), "n_val": len(val_images), **out,
            "settings": {**{f: getattr(settings, f) for f in ("epochs", "batch_size", "seed")},
                         "lr": args.lr, "wd": args.wd, "holdout": args.holdout, "overlap": args.overlap}}
