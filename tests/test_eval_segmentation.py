"""comp probe --task segmentation: ADE20K layout and ignore labels, mIoU, token order, the
dense head against a pooled one, toyworld's seg split, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from comp import cli
from comp.data import toyworld as tw
from comp.data.image import CompImageProcessor
from comp.eval import segmentation as seg
from comp.eval.features import cached_features, load_encoder, to_raster
from comp.eval.heads import TrainSettings

TILE_COLOURS = ((220, 40, 40), (40, 180, 60), (40, 70, 220), (240, 220, 30))


def _tiled_split(root, n: int, seed: int):
    """ADE20K layout: images of flat 28 px tiles (2x2 patches of the 14 px grid), each tile
    one of 4 colours at random; the label of a pixel is its tile's colour + 1. (With 14 px
    tiles the bilinear upsampling of patch logits alone caps the pixel mIoU near 0.9:
    measured 0.90 with every patch right.)"""
    gen = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(n):
        h, w = [(3, 4), (4, 3), (2, 4), (3, 3)][i % 4]
        cls_hw = gen.integers(0, len(TILE_COLOURS), size=(h, w))
        pixels = np.array(TILE_COLOURS, dtype=np.uint8)[cls_hw].repeat(28, 0).repeat(28, 1)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        Image.fromarray((cls_hw + 1).astype(np.uint8).repeat(28, 0).repeat(28, 1), mode="L").save(
            root / "annotations" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def seg_split(tmp_path_factory):
    """A small toyworld seg split (the same writer as ``comp data toyworld``)."""
    root = tmp_path_factory.mktemp("tw") / "seg"
    tw.write_seg(root, seed=0, n_train=24, n_val=8)
    return root


def test_dense_head_recovers_patch_classes_that_a_pooled_feature_cannot(tiny_dir, tmp_path):
    """Each patch's class is its colour: the per-token head reads it (measured mIoU 0.98,
    every patch right); the same head on each image's mean token broadcast to all its
    patches can only paint an image one class (measured 0.18)."""
    encoder = load_encoder(tiny_dir("siglip"), max_num_vistoken=64, device="cpu")
    data = {}
    for split, n, seed in (("train", 24, 0), ("val", 8, 1)):
        images, anns = seg.read_split(_tiled_split(tmp_path / split, n, seed))
        tokens, grid_N3 = cached_features(encoder, images, None)
        data[split] = (tokens, grid_N3, seg.load_labels(images, anns))
    settings = TrainSettings(epochs=40, lr=1e-2, wd=0.0, batch_size=8, seed=0)
    names = ["a", "b", "c", "d"]

    def miou(pool: bool) -> float:
        (tr, tr_grid, tr_y), (va, va_grid, va_y) = data["train"], data["val"]
        if pool:
            tr, va = ([t.mean(0, keepdim=True).expand_as(t) for t in ts] for ts in (tr, va))
        head = seg.train_head(tr, tr_grid, tr_y, 4, settings)
        return seg.scores(seg.evaluate(head, va, va_grid, va_y, 4), names)["miou"]

    dense, pooled = miou(pool=False), miou(pool=True)
    assert dense > 0.9, dense
    assert pooled < 0.4, pooled


def test_ade_layout_maps_labels_and_ignores_label_0(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for sub in ("images/validation", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (6, 4)).save(root / "images/validation/a.jpg")
    raw_HW = np.array([[1, 1, 2, 2, 0, 0]] * 4, dtype=np.uint8)  # right third unlabelled
    Image.fromarray(raw_HW, mode="L").save(root / "annotations/validation/a.png")
    images, anns = seg.read_split(root, "validation")
    assert [p.name for p in images] == ["a.jpg"] and [p.name for p in anns] == ["a.png"]
    (label_HW,) = seg.load_labels(images, anns)
    assert label_HW[0].tolist() == [0, 0, 1, 1, seg.IGNORE, seg.IGNORE]

    # the metric: a right answer on the labelled pixels and anything on the ignored ones is
    # a perfect score; had label 0 been counted (as a third class), these predictions would not be
    pred_HW = torch.tensor([[0, 0, 1, 1, 1, 0]] * 4)
    assert seg.scores(seg.confusion(pred_HW, label_HW, 2), ["x", "y"])["miou"] == 1.0
    counted_HW = torch.from_numpy(np.where(raw_HW == 0, 3, raw_HW).astype(np.int64) - 1)
    assert seg.scores(seg.confusion(pred_HW, counted_HW, 3), ["x", "y", "z"])["miou"] < 0.7

    # the loss: cross-entropy over the labelled pixels only, whatever the ignored ones' logits
    logits_TK = torch.randn(2, 2)  # a 1x2 patch grid over the 4x6 map
    grid_B3 = torch.tensor([[1, 1, 2]])
    up_KHW = seg.upsample_logits(logits_TK, grid_B3[0], (4, 6))
    keep = label_HW != seg.IGNORE
    expected = torch.nn.functional.cross_entropy(up_KHW.permute(1, 2, 0)[keep], label_HW[keep].long())
    torch.testing.assert_close(seg.pixel_loss(logits_TK, grid_B3, [label_HW]), expected)
    relabelled = torch.where(keep, label_HW, torch.tensor(0, dtype=torch.uint8))
    assert not torch.allclose(seg.pixel_loss(logits_TK, grid_B3, [relabelled]), expected)


def test_miou_of_a_hand_computed_confusion_matrix():
    label_HW = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 3]])
    pred_HW = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 3]])
    conf = seg.confusion(pred_HW, torch.cat([label_HW[:, :10], torch.tensor([[seg.IGNORE]])], 1), 4)
    assert conf.tolist() == [[3, 1, 0, 0], [2, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    conf[3, 2] = 1  # class 3 missed once, predicted as 2: both are in the mean, with IoU 0
    out = seg.scores(conf, ["a", "b", "c", "d"])
    # IoU = TP / (TP + FP + FN): a 3 / (3 + 2 + 1), b 4 / (4 + 1 + 2), c 0 / 1, d 0 / 1
    assert out["iou"] == pytest.approx({"a": 0.5, "b": 4 / 7, "c": 0.0, "d": 0.0})
    assert out["miou"] == pytest.approx((0.5 + 4 / 7) / 4)
    assert out["pixel_acc"] == pytest.approx(7 / 11)
    conf[3, 2] = 0  # now c and d are absent from truth and prediction: left out of the mean
    out = seg.scores(conf, ["a", "b", "c", "d"])
    assert out["iou"]["c"] is None and out["absent_classes"] == ["c", "d"] and out["classes_in_mean"] == 2
    assert out["miou"] == pytest.approx((0.5 + 4 / 7) / 2)


def test_packed_tokens_unpermute_to_the_patch_grid(tiny_dir):
    """An image whose 14 px patches hold their raster index as grey level: the processor
    packs them in 2x2 merge-window order; to_raster + token_grid give the grid back."""
    h, w = 4, 6
    index_hw = np.arange(h * w, dtype=np.uint8).reshape(h, w)
    image = Image.fromarray(index_hw.repeat(14, 0).repeat(14, 1), mode="L")
    proc = CompImageProcessor(image_mean=0.0, image_std=1 / 255)  # pixel values unchanged
    batch = proc([image])
    grid_3 = batch["image_grid_thw"][0]
    packed_T = batch["pixel_values"][:, 0].round().long()
    assert grid_3.tolist() == [1, h, w]
    assert packed_T[:4].tolist() == [0, 1, 6, 7]  # first merge window: rows 0-1, cols 0-1
    grid_hw1 = seg.token_grid(to_raster(packed_T[:, None], h, w), grid_3)
    assert torch.equal(grid_hw1[..., 0], torch.from_numpy(index_hw).long())
    # and upsampling keeps that orientation: the logit of patch (r, c) peaks on its pixels
    logits_TK = torch.nn.functional.one_hot(torch.arange(h * w)).float()
    up_KHW = seg.upsample_logits(logits_TK, grid_3, (h * 14, w * 14))
    assert torch.equal(up_KHW.argmax(0)[7::14, 7::14], torch.from_numpy(index_hw).long())


@pytest.mark.parametrize("height, width", [(448, 224), (224, 1008), (700, 700), (112, 112)])
def test_sliding_windows_cover_the_canvas_within_the_budget(height, width):
    budget = 64 * 28 * 28  # 64 merged tokens: 224 x 224 px
    boxes = seg.sliding_windows(height, width, budget, 28, overlap=1 / 3)
    cover_HW = torch.zeros(height, width, dtype=torch.long)
    for top, left, h, w in boxes:
        assert h * w <= budget and h % 28 == 0 and w % 28 == 0
        assert top + h <= height and left + w <= width
        cover_HW[top:top + h, left:left + w] += 1
    assert cover_HW.min() >= 1
    starts = sorted({top for top, *_ in boxes})
    h = boxes[0][2]
    assert all(b - a <= h * 2 / 3 for a, b in zip(starts, starts[1:]))  # neighbours overlap >= 1/3
    # per side: 1 + ceil((side - 224) / floor(224 * 2 / 3)), e.g. 448 -> 1 + ceil(224 / 149) = 3
    assert len(boxes) == {(448, 224): 3, (224, 1008): 7, (700, 700): 25, (112, 112): 1}[(height, width)]


def test_toyworld_label_maps_align_with_the_image(seg_split):
    assert json.loads((seg_split / "classes.json").read_text()) == list(tw.SEG_CLASSES)
    assert seg.read_class_names(seg_split / "train") == list(tw.SEG_CLASSES)
    images, anns = seg.read_split(seg_split / "val")
    entries = json.loads((seg_split / "val.json").read_text())
    assert [e["annotation"] for e in entries] == [f"val/annotations/{a.name}" for a in anns]
    ignored = 0
    for entry, label_HW in zip(entries, seg.load_labels(images, anns)):
        rgb_HW3 = np.asarray(Image.open(seg_split / entry["image"]).convert("RGB"))
        y_HW = label_HW.numpy()
        scene = entry["meta"]
        background = tw.SEG_CLASSES.index("background")
        assert (rgb_HW3[y_HW == background] == tw.BACKGROUNDS[scene["background"]]).all()
        for o in scene["objects"]:
            k = tw.SEG_CLASSES.index(o["shape"])
            x0, y0, x1, y1 = o["bbox"]
            assert (y_HW == k).any() and (y_HW[y0:y1, x0:x1] == k).sum() == (y_HW == k).sum()
            assert (rgb_HW3[y_HW == k] == tw.COLOURS[o["colour"]]).all()
        # text: at least half ink (nearer the ink's colour than the background's); the
        # ignored rim: inked, but less
        half_ink = (np.array(tw.TEXT_RGB) + np.array(tw.BACKGROUNDS[scene["background"]])) / 2
        for kind in ("word", "number"):
            k = tw.SEG_CLASSES.index(kind)
            assert (rgb_HW3[y_HW == k] <= half_ink + 1).all()
            assert (y_HW == k).any() == any(t["kind"] == kind for t in scene["texts"])
        rim = y_HW == seg.IGNORE
        ignored += int(rim.sum())
        assert rim.any() == bool(scene["texts"])
        assert (rgb_HW3[rim] >= half_ink - 1).all()
        assert (rgb_HW3[rim] != tw.BACKGROUNDS[scene["background"]]).any(-1).all()
    assert ignored > 0


def test_cli_scores_fixed_native_and_sliding_and_names_a_missing_annotation(tiny_dir, seg_split, tmp_path,
                                                                           capsys):
    argv = ["probe", str(tiny_dir("siglip")), "--task", "segmentation", "--train", str(seg_split / "train"),
            "--val", str(seg_split / "val"), "--max_num_vistoken", "64", "--epochs", "5", "--lr", "0.1",
            "--wd", "0", "--device", "cpu", "--out", str(tmp_path / "seg.json")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "seg.json").read_text())
    assert report["task"] == "segmentation" and report["classes"] == list(tw.SEG_CLASSES)
    assert report["sizes_run"] == ["fixed", "native", "sliding"] and report["fixed_size"] == 56
    for size in report["sizes_run"]:
        res = report["results"][size]
        assert 0 <= res["miou"] <= 1 and 0 <= res["pixel_acc"] <= 1 and f"{size:>8}  mIoU" in printed
        assert set(res["iou"]) == set(tw.SEG_CLASSES)
    assert report["results"]["sliding"]["images_windowed"] > 0  # toyworld goes up to 448 px a side
    assert report["results"]["fixed"]["tokens_per_image"] == 16  # 56 x 56 px: 4 x 4 patches
    # background covers most pixels; the tiny random encoder finds it at least
    assert report["results"]["native"]["iou"]["background"] > 0.5

    (seg_split / "val" / "annotations" / "00003.png").rename(tmp_path / "moved.png")
    try:
        assert cli.main(argv) == 2
    finally:
        (tmp_path / "moved.png").rename(seg_split / "val" / "annotations" / "00003.png")
    err = capsys.readouterr().err.strip().splitlines()
    image = seg_split / "val" / "images" / "00003.png"
    assert err[-1] == (f"comp probe: image without annotation ({image}): add its label map "
                       f"{seg_split / 'val' / 'annotations' / '00003.png'} or remove the image")
