"""``comp probe VFM --train DIR --val DIR``: frozen-encoder probes on ImageFolder data.

One forward pass per image (cached, see ``features``) feeds three probes:
- linear: a linear classifier on the mean-pooled features, standardised with train statistics;
- attentive: the paper's protocol, a learned query cross-attending to the frozen tokens
  (then LayerNorm + linear), AdamW, 10 epochs by default;
- k-NN: cosine similarity of pooled features, the k (20, or fewer for small sets) nearest
  training images vote, weighted by exp(sim / 0.07) as in DINO's protocol.
Learning rate and weight decay of the two trained probes are chosen as in DINOv2's and CLIP's
linear evaluations: every (lr, wd) of a small grid is trained on the training split minus a
held-out part (``--holdout``, per class), the best on the held-out part wins (ties: the
earlier grid entry), and the winner is retrained on the whole training split; a single lr
and wd skip the sweep. Everything random draws from the seed, so a seed gives the same
accuracies. ``--task segmentation`` runs the dense linear probe of ``segmentation`` instead
(same sweep, training loop and flags).

Shape legend: N images, B a batch, L tokens (padded), D encoder width, C classes, K neighbours.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from comp.data.image import IMAGE_SUFFIXES, ImageLoadError
from comp.cliargs import ArgumentParser, apply_threads, positive_int
from comp.eval.features import add_budget_flags, budget_text, cached_features, load_encoder, mean_pool
from comp.eval.heads import TrainSettings, attentive_probe, knn_predict, linear_probe, select_setting, top1
from comp.files import atomic_output, refuse_output_over_input
from comp.models.vision.configuration import POS_ORDERS

PROBES = ("linear", "attentive", "knn")
# The sweep: wide enough for a few hundred images (few steps) and for ImageNet-size sets.
DEFAULT_LRS = (1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_WDS = (0.0, 0.05)


# ----------------------------------------------------------------------------- data


def read_image_folder(root: str | Path,
                      classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout (``root/<class>/<image>``) -> (paths, labels, classes), sorted.

    ``classes`` (the training split's) fixes the label order; a class folder outside it is
    an error, a class without validation images is allowed."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (expected ImageFolder layout root/<class>/<image>)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise ValueError(f"{root}: no class folders (expected ImageFolder layout root/<class>/<image>)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown} do not exist in the training split "
                         f"{classes}; rename or remove them")
    paths: list[Path] = []
    labels: list[int] = []
    for name in found:
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [classes.index(name)] * len(files)
    if not paths:
        raise ValueError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths, labels, classes


def run_probes(train_tokens: list[torch.Tensor], train_y: torch.Tensor, val_tokens: list[torch.Tensor],
               val_y: torch.Tensor, num_classes: int, probes: list[str], settings: TrainSettings,
               k: int = 20, lrs=None, wds=None, holdout: float = 0.2) -> dict[str, dict]:
    """Top-1 of each probe in ``probes`` on the given frozen token features; the trained
    probes use the (lr, wd) of ``lrs`` x ``wds`` selected on a held-out part of train
    (None: ``settings``' single values)."""
    lrs = [settings.lr] if lrs is None else list(lrs)
    wds = [settings.wd] if wds is None else list(wds)
    train_ND, val_ND = mean_pool(train_tokens), mean_pool(val_tokens)
    results: dict[str, dict] = {}
    for name in probes:
        if name == "knn":
            pred = knn_predict(train_ND, train_y, val_ND, num_classes, k)
            results[name] = {"top1": top1(pred, val_y), "k": min(k, len(train_ND))}
            continue
        if name == "linear":
            def fit_predict(fit_idx, eval_idx, s, x=train_ND, y=train_y, ex=None):
                ex = x[eval_idx] if ex is None else ex
                return linear_probe(x[fit_idx], y[fit_idx], ex, num_classes, s)
        elif name == "attentive":
            def fit_predict(fit_idx, eval_idx, s, x=train_tokens, y=train_y, ex=None):
                ex = [x[i] for i in eval_idx.tolist()] if ex is None else ex
                return attentive_probe([x[i] for i in fit_idx.tolist()], y[fit_idx], ex, num_classes, s)
        else:
            raise ValueError(f"unknown probe {name!r}; choose from {PROBES}")
        chosen, sweep = select_setting(fit_predict, train_y, settings, lrs, wds, holdout, f"{name} sweep")
        everything = torch.arange(len(train_y))
        pred = fit_predict(everything, None, chosen, ex=val_ND if name == "linear" else val_tokens)
        results[name] = {"top1": top1(pred, val_y), "lr": chosen.lr, "wd": chosen.wd}
        if sweep:
            results[name]["sweep"] = sweep
    return results


# ----------------------------------------------------------------------------- CLI


def _probe_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in PROBES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--probes takes a comma list of {','.join(PROBES)}, got {value!r}")
    return names


def _float_list(value: str) -> list[float]:
    try:
        values = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma list of non-negative numbers, got {value!r}")
    return values


def _size_list(value: str) -> list[str]:
    from comp.eval.segmentation import SIZES

    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or any(n not in SIZES for n in names):
        raise argparse.ArgumentTypeError(f"--sizes takes a comma list of {','.join(SIZES)}, got {value!r}")
    return [n for n in SIZES if n in names]  # native before sliding (sliding uses its head)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="comp probe",
        description="Frozen-encoder probes (linear, attentive pooling, k-NN) on ImageFolder splits\n"
                    "(root/<class>/<image>); prints top-1 per probe and the lr/wd each trained\n"
                    "probe chose on a held-out part of the training split.\n"
                    "--task segmentation: a linear head on every patch token, trained and scored\n"
                    "(mIoU) on ADE20K-layout splits (DIR/images, DIR/annotations: label PNGs, 0 = ignore)\n"
                    "at a fixed square size, at native size and by sliding windows.")
    p.add_argument("vfm", help="encoder: directory or Hub id (HF SigLIP/DINOv2/AIMv2 or CoMP-VFM)")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                   help="classification: ImageFolder probes; segmentation: the dense linear probe")
    p.add_argument("--train", type=Path, required=True,
                   help="training split: ImageFolder root, or (segmentation) a directory holding images/ "
                        "and annotations/")
    p.add_argument("--val", type=Path, required=True, help="validation split, as --train")
    add_budget_flags(p)
    p.add_switch("--use_rope", default=None, help="2D RoPE on/off; default: the checkpoint's setting")
    p.add_argument("--pos_order", choices=POS_ORDERS, default=None,
                   help="order of the absolute position table: merge, or raster as the reference "
                        "code trained; default: the checkpoint's (raster when detected as "
                        "reference-trained)")
    p.add_argument("--probes", type=_probe_list, default=list(PROBES),
                   help="comma list of linear,attentive,knn (default: all)")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs of the linear and attentive probes")
    p.add_argument("--lr", type=_float_list, default=list(DEFAULT_LRS),
                   help="AdamW learning rate(s), comma list: swept with --wd "
                        f"(default {','.join(map(str, DEFAULT_LRS))})")
    p.add_argument("--wd", type=_float_list, default=list(DEFAULT_WDS),
                   help=f"weight decay(s), comma list (default {','.join(map(str, DEFAULT_WDS))})")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of each training class (segmentation: of the training images) "
                        "held out to select lr and wd")
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="probe training batch size (default 32 images; segmentation 8)")
    p.add_argument("--k", type=positive_int, default=20, help="k-NN neighbours (capped at the train size)")
    p.add_argument("--seed", type=int, default=0, help="seeds the probes, the held-out split and the batches")
    p.add_argument("--batch_tokens", type=positive_int, default=16384, help="encoder tokens per forward pass")

    p.add_argument("--device", default=None, help="encoder device, e.g. cpu, cuda:0; default: CUDA when available")
    p.add_threads()
    seg = p.add_argument_group("segmentation", "with --task segmentation; --resolution N sets the fixed "
                               "size (default: the encoder's training size)")
    seg.add_argument("--train_split", default=None,
                     help="subfolder of images/ and annotations/ under --train (ADEChallengeData2016: training)")
    seg.add_argument("--val_split", default=None,
                     help="subfolder of images/ and annotations/ under --val (ADEChallengeData2016: validation)")
    seg.add_argument("--sizes", type=_size_list, default="fixed,native,sliding",
                     help="comma list of fixed,native,sliding (sliding: only images over the budget)")
    seg.add_argument("--overlap", type=float, default=1 / 3, help="least overlap of sliding windows, in [0, 1) (default %(default).2f)")
    seg.add_argument("--max_train_images", type=int, default=None,
                     help="use this many training images, evenly spread (features of all ADE20K's "
                          "20k images at native size do not fit in memory)")
    p.add_argument("--cache", type=Path, default=None, help="feature cache directory (reused across runs)")
    p.add_out("JSON result file", required=False, type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.holdout < 1:
        print(f"comp probe: --holdout must be in (0, 1), got {args.holdout}", file=sys.stderr)
        return 2
    if not 0 <= args.overlap < 1:
        print(f"comp probe: --overlap must be in [0, 1), got {args.overlap}", file=sys.stderr)
        return 2
    if args.out is not None:
        refuse_output_over_input(args.out, [args.vfm, args.train, args.val])
    apply_threads(args.threads)
    dense = args.task == "segmentation"
    batch_size = args.batch_size or (8 if dense else 32)
    settings = TrainSettings(args.epochs, args.lr[0], args.wd[0], batch_size, args.seed)
    start = time.perf_counter()
    if dense:
        return _segmentation_main(args, settings, start)
    try:
        train_paths, train_labels, classes = read_image_folder(args.train)
        val_paths, val_labels, _ = read_image_folder(args.val, classes)
        encoder = load_encoder(args.vfm, use_rope=args.use_rope, resolution=args.resolution,
                               max_num_vistoken=args.max_num_vistoken, device=args.device,
                               pos_order=args.pos_order)
        print(f"comp probe: {budget_text(encoder)}", file=sys.stderr)
        train_tokens, _ = cached_features(encoder, train_paths, args.cache, args.batch_tokens, desc="encode train")
        val_tokens, _ = cached_features(encoder, val_paths, args.cache, args.batch_tokens, desc="encode val")
        results = run_probes(train_tokens, torch.tensor(train_labels), val_tokens, torch.tensor(val_labels),
                             len(classes), args.probes, settings, args.k, args.lr, args.wd, args.holdout)
    except (ImageLoadError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"comp probe: {err}", file=sys.stderr)
        return 2
    for name, res in results.items():
        chosen = (f"  (lr {res['lr']:g}, wd {res['wd']:g}" + (f", best of {len(res['sweep'])} on "
                  f"{args.holdout:.0%} of train held out)" if "sweep" in res else ")")) if "lr" in res else ""
        print(f"{name:>9}  top-1 {100 * res['top1']:.2f}{chosen}")
    report = {"model": str(args.vfm), "train": str(args.train), "val": str(args.val),
              "resolution": args.resolution or "native", "budget": budget_text(encoder),
              "encoder": encoder.setting, "classes": classes, "n_train": len(train_paths),
              "n_val": len(val_paths), "chance": 1 / len(classes),
              "settings": {**asdict(settings), "lr": args.lr, "wd": args.wd, "holdout": args.holdout},
              "results": results, "seconds": round(time.perf_counter() - start, 2)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _segmentation_main(args, settings: TrainSettings, start: float) -> int:
    """``--task segmentation``: the encoder at native size (the fixed size is derived from
    it), ``segmentation.main`` for the rest; the same error handling and --out."""
    from comp.eval import segmentation

    try:
        encoder = load_encoder(args.vfm, use_rope=args.use_rope, max_num_vistoken=args.max_num_vistoken,
                               device=args.device, pos_order=args.pos_order)
        report = segmentation.main(args, encoder, settings)
    except (ImageLoadError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"comp probe: {err}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.perf_counter() - start, 2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0
