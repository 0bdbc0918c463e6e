"""Toyworld: deterministic, well-formed, and its labels agree with its pixels.

Pixel oracle: shapes are drawn without anti-aliasing in exact palette colours and text in
near-black, so the colours present in an image, where they are, and where dark ink is can
be read back from the PNG and compared with the stored scene (``meta``).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from comp.data import toyworld as tw

STAGE_YAMLS = ("stage1.yaml", "stage2.yaml", "stage3.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tw.write_toyworld(tmp_path_factory.mktemp("toyworld") / "out", seed=0, size="small")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def load_records(json_path: Path) -> list[dict]:
    if json_path.suffix == ".jsonl":
        return [json.loads(line) for line in json_path.read_text().splitlines()]
    return json.loads(json_path.read_text())


def stage_datasets(world: Path, name: str) -> list[tuple[Path, Path]]:
    """(json_path, image_folder) per entry of a Stage YAML, resolved against its directory."""
    doc = yaml.safe_load((world / name).read_text())
    return [(world / d["json_path"], world / d["image_folder"]) for d in doc["datasets"]]


def palette_pixels(rgb_HW3: np.ndarray) -> dict[str, np.ndarray]:
    """Colour name -> boolean mask of the pixels exactly of that palette colour (non-empty only)."""
    masks = {name: np.all(rgb_HW3 == np.array(c, dtype=np.uint8), axis=-1)
             for name, c in tw.COLOURS.items()}
    return {name: m for name, m in masks.items() if m.any()}


def dominant_colour(rgb_HW3: np.ndarray) -> str:
    return max(palette_pixels(rgb_HW3).items(), key=lambda kv: kv[1].sum())[0]


def inside(mask_HW: np.ndarray, bbox, pad: int = 0) -> bool:
    ys, xs = np.nonzero(mask_HW)
    return bool(xs.min() >= bbox[0] - pad and xs.max() < bbox[2] + pad
                and ys.min() >= bbox[1] - pad and ys.max() < bbox[3] + pad)


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("xy, word", [((10, 10), "top left"), ((150, 10), "top"),
                                      ((290, 10), "top right"), ((10, 50), "left"),
                                      ((150, 50), "center"), ((299, 99), "bottom right"),
                                      ((150, 90), "bottom")])
def test_position_word_is_the_3x3_cell(xy, word):
    assert tw.position_word(*xy, 300, 100) == word


def test_sample_size_covers_sides_and_aspects():
    sizes = np.array([tw.sample_size(tw.rng_for(0, "sizes", i)) for i in range(400)])
    aspect = sizes[:, 0] / sizes[:, 1]
    assert sizes.min() >= tw.SIDE_MIN and sizes.max() <= tw.SIDE_MAX
    assert aspect.min() >= 1 / 4 - 0.01 and aspect.max() <= 4 + 0.01
    assert aspect.min() < 0.4 and aspect.max() > 2.5 and ((aspect > 0.8) & (aspect < 1.25)).any()


def test_reading_order_is_rows_then_left_to_right():
    def text(s, xy):
        return tw.Text(s, "word", "", tw.text_bbox(s, xy, 10), xy, 10)
    scene = tw.Scene(300, 90, "white", (), (text("c", (20, 70)), text("b", (200, 5)),
                                            text("a", (20, 5))))
    assert tw.transcript(scene) == "a b\nc"


def test_scale_scene_doubles_geometry_and_fonts():
    scene = tw.pool_scene(tw.rng_for(3, "pool", 0))
    big = tw.scale_scene(scene, 2)
    assert (big.width, big.height) == (2 * scene.width, 2 * scene.height)
    assert [o.bbox for o in big.objects] == [tuple(2 * v for v in o.bbox) for o in scene.objects]
    assert [t.font_size for t in big.texts] == [2 * t.font_size for t in scene.texts]
    assert tw.render(big).size == (big.width, big.height)


# ---------------------------------------------------------------- the written dataset

def test_same_seed_same_bytes_and_earlier_output_replaced(world, tmp_path, capsys):
    earlier = tmp_path / "earlier"
    (earlier / "images" / "pool").mkdir(parents=True)
    (earlier / "images" / "pool" / "999999.png").write_bytes(b"stale")
    (earlier / "manifest.json").write_text(json.dumps({"name": "toyworld", "seed": 7}))
    assert tw.main(["--out", str(earlier), "--seed", "0", "--size", "small"]) == 0
    assert "images" in capsys.readouterr().out
    assert tree_digest(earlier) == tree_digest(world)


def test_different_seeds_give_different_scenes_and_bytes():
    def pngs(seed: int) -> list[bytes]:
        return [tw.png_bytes(tw.render(tw.pool_scene(tw.rng_for(seed, "pool", i))))
                for i in range(20)]
    first, second = pngs(0), pngs(1)
    assert pngs(0) == first
    assert sum(a != b for a, b in zip(first, second)) == 20
    scene = tw.probe_scene(tw.rng_for(0, "probe-digit-val", 3), "digit", "3")
    assert tw.probe_scene(tw.rng_for(0, "probe-digit-val", 3), "digit", "3") == scene
    assert tw.probe_scene(tw.rng_for(1, "probe-digit-val", 3), "digit", "3") != scene


def test_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a toyworld output"):
        tw.write_toyworld(tmp_path)
    assert tw.main(["--out", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="size 'huge'"):
        tw.write_toyworld(tmp_path / "new", size="huge")


def test_module_runs_as_a_script():
    done = subprocess.run([sys.executable, "-m", "comp.data.toyworld", "--help"],
                          capture_output=True, text=True, check=True)
    assert "--size" in done.stdout


def test_stage_yamls_point_to_existing_files(world):
    for name in STAGE_YAMLS:
        doc = yaml.safe_load((world / name).read_text())
        assert doc["datasets"] and all(d["sampling_strategy"] == "all" for d in doc["datasets"])
        for json_path, image_folder in stage_datasets(world, name):
            assert json_path.is_file() and image_folder.is_dir()
    assert [p.name for p, _ in stage_datasets(world, "stage2.yaml")] == [
        "stage2_dense.json", "stage2_ocr.jsonl"]


def test_records_are_valid_llava_conversations(world):
    ids = set()
    for name in STAGE_YAMLS:
        for json_path, image_folder in stage_datasets(world, name):
            records = load_records(json_path)
            assert records, json_path
            for r in records:
                assert r["id"] not in ids
                ids.add(r["id"])
                images = r.get("image", [])
                images = [images] if isinstance(images, str) else images
                turns = r["conversations"]
                assert len(turns) >= 2 and len(turns) % 2 == 0, r["id"]
                assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
                assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
                human = "".join(t["value"] for t in turns if t["from"] == "human")
                assert human.count("<image>") == len(images), r["id"]
                assert not any("<image>" in t["value"] for t in turns if t["from"] == "gpt")
                assert all((image_folder / p).is_file() for p in images), r["id"]
                assert len(r["meta"]["scenes"]) == len(images)


def test_stage3_mixes_single_multi_image_and_text_only(world):
    records = load_records(world / "data" / "stage3_qa.json")
    kinds = [r["meta"]["task"] for r in records]
    assert kinds.count("multi_image_qa") == tw.SIZES["small"]["multi"]
    assert kinds.count("text_qa") == tw.SIZES["small"]["text_only"]
    assert all(isinstance(r["image"], list) and len(r["image"]) == 2
               for r in records if r["meta"]["task"] == "multi_image_qa")
    assert all("image" not in r for r in records if r["meta"]["task"] == "text_qa")
    assert any(len(r["conversations"]) > 2 for r in records if r["meta"]["task"] == "qa")


def test_images_have_recorded_sizes_and_varied_aspects(world):
    records = load_records(world / "data" / "stage1_captions.json")
    aspects = []
    for r in records:
        scene = r["meta"]["scenes"][0]
        with Image.open(world / "images" / r["image"]) as im:
            assert im.size == (scene["width"], scene["height"]), r["image"]
        aspects.append(scene["width"] / scene["height"])
    assert min(aspects) < 0.5 and max(aspects) > 2
    assert len({(r["meta"]["scenes"][0]["width"], r["meta"]["scenes"][0]["height"])
                for r in records}) > len(records) // 2


def assert_pixels_match(rgb_HW3: np.ndarray, scene: dict, name: str) -> None:
    """Palette colours present == object colours, each inside its bbox; ink only in text boxes."""
    assert rgb_HW3.shape[:2] == (scene["height"], scene["width"]), name
    masks = palette_pixels(rgb_HW3)
    assert set(masks) == {o["colour"] for o in scene["objects"]}, name
    for o in scene["objects"]:
        assert inside(masks[o["colour"]], o["bbox"]), (name, o)
    ink_HW = np.all(rgb_HW3 < 110, axis=-1)
    covered_HW = np.zeros_like(ink_HW)
    for t in scene["texts"]:
        x0, y0, x1, y1 = t["bbox"]
        assert ink_HW[y0:y1, x0:x1].any(), (name, t)
        covered_HW[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
    assert not (ink_HW & ~covered_HW).any(), name


def test_pixels_agree_with_scene_meta(world):
    for r in load_records(world / "data" / "stage1_captions.json")[:80]:
        rgb_HW3 = np.asarray(Image.open(world / "images" / r["image"]).convert("RGB"))
        assert_pixels_match(rgb_HW3, r["meta"]["scenes"][0], r["image"])


def test_answers_agree_with_scene_meta(world):
    records = load_records(world / "data" / "stage3_qa.json")
    checked = 0
    for r in (r for r in records if r["meta"]["task"] == "qa"):
        scene = r["meta"]["scenes"][0]
        colour_of = {o["shape"]: o["colour"] for o in scene["objects"]}
        numbers = [t["text"] for t in scene["texts"] if t["kind"] == "number"]
        turns = r["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            q = q["value"].removeprefix("<image>\n")
            if q == "How many shapes are there in the image?":
                assert a["value"] == str(len(scene["objects"]))
            elif q.startswith("What colour is the "):
                assert a["value"] == colour_of[q.removeprefix("What colour is the ")[:-1]]
            elif q == "What number is written in the image?":
                assert [a["value"]] == numbers
            else:
                continue
            checked += 1
    assert checked > 100
    ocr = load_records(world / "data" / "stage2_ocr.jsonl")
    for r in ocr:
        words = r["conversations"][1]["value"].split()
        assert sorted(words) == sorted(t["text"] for t in r["meta"]["scenes"][0]["texts"])


@pytest.mark.parametrize("attribute", list(tw.PROBES))
def test_probe_splits_have_classes_and_labels_match_pixels(world, attribute):
    root = world / "probe" / attribute
    classes = set(tw.PROBES[attribute])
    per_class = {"train": tw.SIZES["small"]["probe_train"], "val": tw.SIZES["small"]["probe_val"],
                 "val_hires": tw.SIZES["small"]["probe_val"]}
    entries = {}
    if attribute in tw.READING_PROBES:
        per_class |= {"train_large": per_class["train"], "val_large": per_class["val"]}
    for split, n in per_class.items():
        assert {d.name for d in (root / split).iterdir()} == classes
        assert all(len(list((root / split / c).glob("*.png"))) == n for c in classes)
        entries[split] = json.loads((root / f"{split}.json").read_text())
        for e in entries[split]:
            assert e["image"].split("/")[1] == e["label"]
            meta = e["meta"]
            truth = (meta["objects"][0][attribute] if attribute in ("shape", "colour")
                     else meta["texts"][0]["text"])
            assert truth == e["label"]
            if attribute in ("digit", "word"):  # the label is the only text
                assert [t["kind"] for t in meta["texts"]] == [
                    "number" if attribute == "digit" else "word"]
    for e in entries["train"][:60] + entries["val_hires"][:30]:
        rgb_HW3 = np.asarray(Image.open(root / e["image"]).convert("RGB"))
        assert_pixels_match(rgb_HW3, e["meta"], e["image"])
        if attribute not in ("digit", "word"):
            assert dominant_colour(rgb_HW3) == e["meta"]["objects"][0]["colour"], e["image"]
    for lo, hi in zip(entries["val"], entries["val_hires"]):
        assert lo["label"] == hi["label"]
        assert (hi["meta"]["width"], hi["meta"]["height"]) == (2 * lo["meta"]["width"],
                                                               2 * lo["meta"]["height"])
    if attribute in ("digit", "word"):  # small in large scenes, so that resolution matters
        assert max(t["font_size"] for e in entries["train"] for t in e["meta"]["texts"]) <= max(tw.TYPESETS["small"].probe)
        assert min(max(e["meta"]["width"], e["meta"]["height"]) for e in entries["train"]) >= tw.WIDE_SIDE[0]
        for e in entries["train_large"] + entries["val_large"]:  # one text, large, in a small scene
            assert e["meta"]["texts"][0]["font_size"] in tw.TYPESETS["small"].reading
            assert max(e["meta"]["width"], e["meta"]["height"]) <= tw.TYPESETS["small"].reading_side[1]


def ink_at(meta: dict, side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ink height and width (px) of each scene's text, natively or squeezed into side x side."""
    h, w = [], []
    for m in meta:
        for t in m["texts"]:
            x0, y0, x1, y1 = t["bbox"]
            h.append((y1 - y0) * (side / m["height"] if side else 1))
            w.append((x1 - x0) * (side / m["width"] if side else 1))
    return np.array(h), np.array(w)


@pytest.mark.parametrize("attribute", ["digit", "word"])
def test_reading_probes_are_legible_natively_and_not_at_112_px(world, attribute):
    """The point of these probes: at native size every digit has >= 6 px of ink height (a
    word >= 5, the x-height of one without ascenders); in the toy SigLIP's fixed 112 x 112
    input nearly all fall under 4 px tall or 2.5 px a glyph wide. The large-glyph split is
    the opposite: legible at 112 px, where a fixed-size encoder can learn to read."""
    def metas(split):
        return [e["meta"] for e in json.loads((world / "probe" / attribute / f"{split}.json").read_text())]

    glyph = 2.5 if attribute == "digit" else 2.5 * 5  # words: 5 glyphs
    h, _ = ink_at(metas("val"))
    assert h.min() >= (6 if attribute == "digit" else 5)
    h112, w112 = ink_at(metas("val"), 112)
    small = (h112 < 4) | (w112 < glyph)
    assert small.mean() > 0.95, small.mean()
    assert ink_at(metas("val_hires"))[0].min() >= 2 * h.min()
    for split in ("train_large", "val_large"):
        h112, w112 = ink_at(metas(split), 112)
        assert h112.min() >= 4.5 and w112.min() >= glyph, split


@pytest.mark.parametrize("attribute", ["digit", "word"])
def test_large_type_is_as_large_natively_as_reading_scenes_at_112_px(attribute):
    """The reading toy's typeset: a reading scene's glyphs stay about a patch tall in the toy
    SigLIP's 112 x 112 input (what it learns to read) and barely distorted; a probe's glyphs
    in a long scene are at least that tall natively, but squeezed nearly all are smaller
    along the scene's long axis than any large one and distorted at least 2x in aspect."""
    glyphs = 1 if attribute == "digit" else 5
    label = tw.PROBES[attribute][3]
    large = [tw.probe_scene(tw.rng_for(0, "test-large", i), attribute, label, True, "large").meta()
             for i in range(60)]
    long = [tw.probe_scene(tw.rng_for(0, "test-long", i), attribute, label, False, "large").meta()
            for i in range(60)]
    assert {t["font_size"] for m in large + long for t in m["texts"]} <= set(tw.TYPESETS["large"].reading)
    large_h112, large_w112 = ink_at(large, 112)
    assert large_h112.min() >= 13, large_h112.min()
    large_h, large_w = ink_at(large)
    assert np.abs(np.log((large_w / large_h) / (large_w112 / large_h112))).max() <= np.log(176 / 112) + 0.05
    h, w = ink_at(long)
    assert h.min() >= large_h112.min()
    h112, w112 = ink_at(long, 112)
    wide = np.array([m["width"] >= m["height"] for m in long])
    squeezed = np.where(wide, w112 / glyphs < (large_w112 / glyphs).min(), h112 < large_h112.min())
    assert squeezed.mean() > 0.95, squeezed.mean()
    assert np.abs(np.log((w / h) / (w112 / h112))).min() >= np.log(1.95)


def test_captions_name_their_scene_in_varied_words():
    """Captions carry the image: each names its scene's colours, shapes, digits and words
    (two scenes' captions differ where the scenes do), in phrasing varied enough that
    captions share far fewer words than the canonical form's (bag-of-words cosine)."""
    from comp.demo.claims import mean_pairwise_bow_cos

    scenes = [tw.pool_scene(tw.rng_for(0, "test-captions", i)) for i in range(200)]
    varied = {"short": [tw.short_caption(s, tw.rng_for(0, "test-short", i)) for i, s in enumerate(scenes)],
              "dense": [tw.dense_caption(s, tw.rng_for(0, "test-dense", i)) for i, s in enumerate(scenes)]}
    for kind, captions in varied.items():
        for scene, caption in zip(scenes, captions):
            for o in scene.objects:
                assert f"{o.colour} {o.shape}" in caption or f"{o.shape} in {o.colour}" in caption, caption
            for t in scene.texts:
                assert t.text in caption, caption
        assert len(set(captions)) == len(captions)
        assert mean_pairwise_bow_cos(captions) < 0.55, kind
    canonical = [tw.short_caption(s) for s in scenes]
    assert mean_pairwise_bow_cos(canonical) > mean_pairwise_bow_cos(varied["short"]) + 0.1
    assert len({c.split()[0] for c in varied["short"]}) > 5  # not one opening
    # a scene's shape twin, phrased by the same generator: the captions differ only in shape words
    scene = next(s for s in scenes if len(s.objects) == 3)
    twin = replace(scene, objects=tuple(replace(o, shape=n) for o, n in zip(
        scene.objects, [x for x in tw.SHAPES if x not in {o.shape for o in scene.objects}])))
    a, b = (tw.short_caption(s, tw.rng_for(0, "twin", 0)).split() for s in (scene, twin))
    assert len(a) == len(b) and all((x == y) == (x.strip(",;.()") not in tw.SHAPES) for x, y in zip(a, b))


def test_qa_eval_questions_are_typed_exact_and_asked_as_in_stage3(world):
    entries = json.loads((world / "qa_eval" / "questions.json").read_text())
    per_type = tw.SIZES["small"]["qa_eval"]
    assert [e["type"] for e in entries] == [t for t in tw.QA_TYPES for _ in range(per_type)]
    assert len({e["id"] for e in entries}) == len({e["image"] for e in entries}) == len(entries)
    stage3 = {t["value"].removeprefix("<image>\n")
              for r in load_records(world / "data" / "stage3_qa.json") if r["meta"]["task"] == "qa"
              for t in r["conversations"][::2]}
    for e in entries:
        assert e["question"] in stage3, e["question"]  # a phrasing Stage III trains
        scene = e["meta"]
        objects, texts = scene["objects"], scene["texts"]
        q, a, kind = e["question"], e["answer"], e["type"]
        if kind == "count":
            assert a == str(len(objects))
        elif kind in ("number", "word"):
            assert [t["text"] for t in texts if t["kind"] == kind] == [a]
        else:
            truth = {"colour": {f"What colour is the {o['shape']}?": o["colour"] for o in objects},
                     "shape": {f"Which shape is {o['colour']}?": f"the {o['shape']}" for o in objects},
                     "position": {f"Where is the {o['shape']}?": o["position"] for o in objects}}[kind]
            assert truth[q] == a, e["id"]
        assert a == a.strip() and a and not a.endswith(".")
        lo = np.asarray(Image.open(world / "qa_eval" / e["image"]).convert("RGB"))
        assert_pixels_match(lo, scene, e["image"])
        with Image.open(world / "qa_eval" / e["image_hires"]) as hi:
            assert hi.size == (tw.HIRES_SCALE * scene["width"], tw.HIRES_SCALE * scene["height"])
    # held out: no evaluation scene is a training scene
    pool = {json.dumps(r["meta"]["scenes"][0], sort_keys=True)
            for r in load_records(world / "data" / "stage1_captions.json")}
    assert not pool & {json.dumps(e["meta"], sort_keys=True) for e in entries}
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["qa_eval"] == {"types": list(tw.QA_TYPES), "per_type": per_type,
                                   "hires_scale": tw.HIRES_SCALE}


def test_qa_pairs_are_the_typed_pairs_without_types():
    scene = tw.pool_scene(tw.rng_for(5, "pool", 1))
    typed = tw.typed_qa_pairs(tw.rng_for(5, "q", 0), scene)
    assert tw.qa_pairs(tw.rng_for(5, "q", 0), scene) == [(q, a) for _, q, a in typed]
    assert {t for t, _, _ in typed} >= {"count", "colour", "shape", "position"}
    with pytest.raises(ValueError, match="question type 'size'"):
        tw.qa_eval_item(tw.rng_for(0, "x", 0), "size")


def test_retrieval_captions_unique_and_images_exist(world):
    entries = json.loads((world / "retrieval" / "captions.json").read_text())
    assert len(entries) == tw.SIZES["small"]["retrieval"]
    assert len({e["caption"] for e in entries}) == len(entries)
    assert all((world / "retrieval" / e["image"]).is_file() for e in entries)


def test_manifest_counts_match_files(world):
    manifest = json.loads((world / "manifest.json").read_text())
    assert (manifest["seed"], manifest["size"], manifest["name"]) == (0, "small", "toyworld")
    for name, count in manifest["counts"].items():
        path = world / name
        if path.is_dir():
            assert len(list(path.rglob("*.png"))) == count, name
        else:
            assert len(load_records(path)) == count, name
