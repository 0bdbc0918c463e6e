"""Toy pre-training of the originals CoMP continues from: a two-tower SigLIP and a Qwen2 LM.

The real recipe starts from a SigLIP trained against text at one fixed square resolution and
from a pre-trained Qwen2.5; a demo that starts from random weights measures noise. Here both
are made as the real ones were, at toy scale, with transformers' own classes and losses:

- a tokenizer with one token per word (comp.demo.wordtok: Qwen2's byte-level BPE trained on
  toyworld text until every word is merged);
- ``SiglipModel`` trained with its sigmoid image-text loss (``return_loss=True``), every
  image resized to one square resolution, on captioned toyworld scenes in groups of hard
  negatives: pool scenes with their shape twins (same layout and colours, other shapes: in
  toyworld colour alone tells a random batch's captions apart, and without twins the toy
  never learns shape), and reading scenes (one word or number large enough to stay legible
  at that resolution) with their text siblings (the same scene with other texts), so that
  the toy can learn to read where its input shows the text large; small text in a large
  scene becomes illegible in the squeeze, which native-resolution training should recover.
  A group's captions share one phrasing and differ only where its images do. The default
  toy (FULL) does not learn to read from the sigmoid loss alone; READING does: its reading
  material is set in large type (toyworld's "large" typeset, a few patches tall), half of
  each batch is reading scenes, and beside the sigmoid loss its image tower classifies the
  words that tell its caption from the rest of its group (``distinguishing_words``, a linear
  head that is discarded), as supervision on caption words (SuperClass) teaches a VFM. It
  reads, at a cost in colour and in Stage III (docs/results/demo-claims.md);
- ``Qwen2ForCausalLM`` (tied embeddings, padded table) trained with its causal LM loss on
  toyworld text in the chat format: captions, dense captions, and questions answered from a
  scene's description (the LM never sees images, as a text LM).

Both are saved with ``save_pretrained`` (+ SigLIP's ``preprocessor_config.json``, Qwen2's
generation config and tokenizer), so the recipe loads them exactly as real checkpoints, and
cached under ``$COMP_CACHE/toy-pretrained/<key>/``: the key hashes the seed, the settings and
the source of the code that makes them. ``quality.json`` beside them says how good they are:
SigLIP zero-shot accuracy on probe scenes at its fixed size (class texts ensembled over the
caption forms, as CLIP's prompt ensembles): colour, shape, and digit / word with large
glyphs and with the reading probes' small ones in large scenes; LM perplexity on held-out
text against a unigram model's on the same tokens. The SigLIP trains in a child process
while this one trains the LM (comp.demo.parallel), on a machine with two cores or more.

Shape legend: B batch, S image side, L tokens, C classes, N images, D embedding width.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from comp.data import toyworld as tw

# Bump when what is built changes in a way the hashed sources do not show.
VERSION = 1
SIGLIP_DIR, QWEN2_DIR, QUALITY_FILE = "siglip", "qwen2", "quality.json"
SYSTEM_ROLE_TEXT = "You are a helpful assistant."  # the chat template's default system turn


@dataclass(frozen=True)
class ToySettings:
    """What the toy originals are made of; every field is part of the cache key."""
    # text: scenes whose captions / QA train the tokenizer and the LM, and held-out ones
    text_scenes: int = 3000
    heldout_scenes: int = 200
    # SigLIP: fixed square input (patch 14, as the recipe's image processor cuts patches)
    image_size: int = 112
    patch_size: int = 14
    vision_width: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_len: int = 64  # captions padded / truncated to this many tokens, as SigLIP's
    siglip_images: int = 4000  # pool scenes, half of them the other half's shape twins
    reading_images: int = 4000  # reading scenes (large text), in groups of text siblings
    reading_group: int = 8
    reading_share: float = 0.25  # of every batch: one group of 8
    typeset: str = "small"  # toyworld.TYPESETS: the reading scenes' type and the probes' (zero-shot)
    # weight of the image tower's label (distinguishing_words) beside the sigmoid loss; 0: none
    caption_classification: float = 0.0
    siglip_steps: int = 2000
    siglip_batch: int = 32
    siglip_lr: float = 1e-3
    # Qwen2 LM
    lm_width: int = 128
    lm_layers: int = 2
    lm_heads: int = 4  # head dim 32: mrope sections [4, 6, 6]
    lm_kv_heads: int = 2
    lm_block: int = 128
    lm_steps: int = 400
    lm_batch: int = 16
    lm_lr: float = 2e-3
    # quality report
    probe_per_class: int = 25


FULL = ToySettings()
# The toy that reads (comp demo --toy reading): large type, half of each batch reading, labels.
READING = replace(FULL, typeset="large", reading_share=0.5, caption_classification=1.0)
# For tests: seconds, not minutes.
QUICK = replace(FULL, text_scenes=400, heldout_scenes=40, image_size=84, siglip_images=800,
                reading_images=400, siglip_steps=500, lm_steps=300, lm_batch=8, probe_per_class=12)


@dataclass(frozen=True)
class ToyOriginals:
    siglip: Path
    qwen2: Path
    quality: dict


# ----------------------------------------------------------------------------- cache


def cache_key(seed: int, settings: ToySettings) -> str:
    """Hash of the seed, the settings and the source of everything that shapes the models
    (this module, the tokenizer, toyworld, the chat template)."""
    from comp.tokens import CHAT_TEMPLATE_PATH
    from comp.demo import wordtok

    sources = [Path(__file__), Path(wordtok.__file__), Path(tw.__file__), CHAT_TEMPLATE_PATH]
    import transformers

    blob = {"version": VERSION, "seed": seed, "settings": asdict(settings),
            "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
            "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_toys(seed: int = 0, settings: ToySettings = FULL, cache_dir: str | Path | None = None,
                    log=print, jobs: int | None = None, alongside: Callable[[Path], object] | None = None
                    ) -> ToyOriginals:
    """The toy SigLIP and Qwen2 for ``seed``: read from the cache, else built there (in a
    temporary directory renamed into place, so a crash never leaves half a checkpoint and two
    concurrent builds both end with a complete one). ``cache_dir`` None:
    ``$COMP_CACHE/toy-pretrained`` (see comp.data.lengths.cache_root). ``jobs`` and
    ``alongside``: see ``build_toys``; from the cache, ``alongside(final directory)`` runs
    right away."""
    from comp.data.lengths import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "toy-pretrained"
    final = root / cache_key(seed, settings)
    if not (final / QUALITY_FILE).exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_toys(tmp, seed, settings, log=log, jobs=jobs, alongside=alongside)
            alongside = None
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished first: keep its (identical) build
                if not (final / QUALITY_FILE).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if alongside is not None:
        alongside(final)
    quality = json.loads((final / QUALITY_FILE).read_text())
    return ToyOriginals(final / SIGLIP_DIR, final / QWEN2_DIR, quality)


def build_toys(out: Path, seed: int, settings: ToySettings, log=print, jobs: int | None = None,
               alongside: Callable[[Path], object] | None = None) -> dict:
    """Tokenizer, SigLIP and Qwen2 for ``seed`` into ``out`` (siglip/, qwen2/, quality.json).

    With ``jobs`` >= 2 (None: comp.demo.parallel.default_jobs) the SigLIP trains in a child
    process (at this process's torch thread count) while this one trains the LM and then runs
    ``alongside(out)`` (other work that needs no SigLIP, e.g. writing toyworld and counting
    the word prior with ``out``/qwen2's tokenizer); each seeds its own generators, so the
    weights are the same as with ``jobs`` 1, where everything runs here in turn."""
    from comp.demo.parallel import ChildCall, default_jobs

    out.mkdir(parents=True, exist_ok=True)
    quality: dict = {"seed": seed, "settings": asdict(settings), "seconds": {}}
    start = time.perf_counter()
    train_docs = text_documents(seed, "train", settings.text_scenes)
    tokenizer = train_tokenizer(train_docs)
    quality["vocab_size"] = len(tokenizer)
    quality["seconds"]["tokenizer"] = round(time.perf_counter() - start, 2)

    job = (tokenizer, seed, settings, out / SIGLIP_DIR, torch.get_num_threads())
    if (jobs or default_jobs()) >= 2:
        with ChildCall(out / ".siglip-job", "comp.demo.pretrain:build_siglip", *job) as siglip:
            quality["lm"], quality["seconds"]["lm"] = build_lm(tokenizer, train_docs, out, seed, settings, log)
            if alongside is not None:
                alongside(out)
            quality["siglip"], quality["seconds"]["siglip"] = siglip.result()
        shutil.rmtree(out / ".siglip-job")
    else:
        quality["siglip"], quality["seconds"]["siglip"] = build_siglip(*job)
        quality["lm"], quality["seconds"]["lm"] = build_lm(tokenizer, train_docs, out, seed, settings, log)
        if alongside is not None:
            alongside(out)
    q = quality["siglip"]
    log(f"toy SigLIP (seed {seed}): zero-shot colour {q['colour_accuracy']:.3f}, shape {q['shape_accuracy']:.3f}, "
        f"digit {q['digit_large_accuracy']:.3f} / word {q['word_large_accuracy']:.3f} with large glyphs, "
        f"{q['digit_small_accuracy']:.3f} / {q['word_small_accuracy']:.3f} with small ones in large scenes, "
        f"in {quality['seconds']['siglip']:.0f} s")
    (out / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
    return quality


def build_siglip(tokenizer, seed: int, settings: ToySettings, out: Path, threads: int) -> tuple[dict, float]:
    """Train and save the toy SigLIP into ``out`` -> (its quality, seconds)."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    siglip, quality = train_siglip(tokenizer, seed, settings)
    save_siglip(siglip, tokenizer, settings, out)
    return quality, round(time.perf_counter() - start, 2)


def build_lm(tokenizer, train_docs, out: Path, seed: int, settings: ToySettings, log=print) -> tuple[dict, float]:
    """Train and save the toy Qwen2 into ``out``/qwen2 -> (its quality, seconds)."""
    start = time.perf_counter()
    heldout_docs = text_documents(seed, "heldout", settings.heldout_scenes)
    lm, quality = train_lm(tokenizer, train_docs, heldout_docs, seed, settings)
    save_lm(lm, tokenizer, out / QWEN2_DIR)
    seconds = round(time.perf_counter() - start, 2)
    log(f"toy Qwen2 (seed {seed}): held-out perplexity {quality['perplexity']:.2f} "
        f"(unigram {quality['unigram_perplexity']:.2f}) in {seconds:.0f} s")
    return quality, seconds


# ----------------------------------------------------------------------------- text


def scene_conversations(rng: np.random.Generator, scene: tw.Scene) -> list[list[dict]]:
    """Chat conversations about one scene, as text: a caption and a dense caption asked for
    without context (the text prior of captions), and questions, a transcript, answered from
    the scene's dense description given in the user turn."""
    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    def assistant(text: str) -> dict:
        return {"role": "assistant", "content": text}

    context = tw.dense_caption(scene, rng)
    pairs = tw.qa_pairs(rng, scene)
    chosen = [pairs[int(i)] for i in rng.permutation(len(pairs))[:int(rng.integers(2, 5))]]
    qa = [user(f"{context}\n{chosen[0][0]}"), assistant(chosen[0][1])]
    for question, answer in chosen[1:]:
        qa += [user(question), assistant(answer)]
    convs = [[user(str(rng.choice(tw.CAPTION_PROMPTS))), assistant(tw.short_caption(scene, rng))],
             [user(str(rng.choice(tw.DENSE_PROMPTS))), assistant(tw.dense_caption(scene, rng))], qa]
    if scene.texts:
        convs.append([user(f"{context}\n{rng.choice(tw.OCR_PROMPTS)}"), assistant(tw.transcript(scene))])
    return convs


def _from_record(record: dict) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]


def text_documents(seed: int, split: str, n_scenes: int) -> list[list[dict]]:
    """Conversations of ``n_scenes`` pool scenes (and one text-only QA per 8 scenes, as
    toyworld's Stage III mixes them), from their own generator stream per split."""
    docs: list[list[dict]] = []
    for i in range(n_scenes):
        rng = tw.rng_for(seed, f"toy-text-{split}", i)
        docs += scene_conversations(rng, tw.pool_scene(rng))
        if i % 8 == 0:
            docs.append(_from_record(tw.text_only_record(rng, f"text-{i}")))
    return docs


def lexicon() -> list[str]:
    """Every toyworld word the probes and questions name, so the vocabulary never depends on
    which scenes were drawn."""
    positions = sorted({tw.position_word(x + 0.5, y + 0.5, 3, 3) for x in range(3) for y in range(3)})
    words = [*tw.COLOURS, *tw.SHAPES, *tw.BACKGROUNDS, *tw.WORDS, *positions, *tw.DIGITS,
             "yes", "no", "the", "a", "shape", "shapes", "number", "word"]
    return [" ".join(words)]


def _special_pattern() -> re.Pattern:
    from comp.models.tiny import QWEN_SPECIAL_TOKENS

    return re.compile("|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS))


def render_chat(tokenizer, conversation: list[dict]) -> str:
    return tokenizer.apply_chat_template(conversation, tokenize=False)


def train_tokenizer(docs: list[list[dict]]):
    """The one-token-per-word tokenizer (comp.demo.wordtok), trained on the text runs the chat
    template puts between its special tokens (so no special token's pieces become words)."""
    from comp.demo.wordtok import train_word_tokenizer

    bootstrap = train_word_tokenizer(lexicon())  # only its chat template and specials are used
    splitter = _special_pattern()
    runs = [run for doc in docs for run in splitter.split(render_chat(bootstrap, doc)) if run]
    return train_word_tokenizer(lexicon() + runs)


def token_stream(tokenizer, docs: list[list[dict]]) -> torch.Tensor:
    """All documents in the chat format, each followed by ``<|endoftext|>``, as one stream."""
    enc = tokenizer([render_chat(tokenizer, d) for d in docs], add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return torch.tensor([t for ids in enc for t in [*ids, eot]], dtype=torch.long)


# ----------------------------------------------------------------------------- SigLIP


def _square_pixels(scene: tw.Scene, size: int) -> np.ndarray:
    """uint8 CHW of the scene rendered natively and resized to size x size (bicubic, as the
    saved preprocessor config says)."""
    from PIL import Image

    image = tw.render(scene).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image).transpose(2, 0, 1)


def _normalise(pixels_u8: torch.Tensor) -> torch.Tensor:
    return (pixels_u8.float() / 255.0 - 0.5) / 0.5  # SigLIP's mean = std = 0.5


def _caption_ids(tokenizer, captions: list[str], length: int) -> tuple[torch.Tensor, int]:
    """Padded / truncated to ``length`` with the pad token, as SigLIP's text tower was fed
    (it pools the last position); returns (ids [B, length], how many were truncated)."""
    from comp.data.conversation import encode_plain_text

    pad = tokenizer.pad_token_id
    rows, truncated = [], 0
    for ids in encode_plain_text(tokenizer, captions)["input_ids"]:
        truncated += len(ids) > length
        rows.append(ids[:length] + [pad] * max(0, length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), truncated


def siglip_config(tokenizer, settings: ToySettings):
    from transformers import SiglipConfig

    s = settings
    pad = tokenizer.pad_token_id
    vision = dict(hidden_size=s.vision_width, intermediate_size=4 * s.vision_width,
                  num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                  image_size=s.image_size, patch_size=s.patch_size)
    text = dict(hidden_size=s.text_width, intermediate_size=4 * s.text_width,
                num_hidden_layers=s.text_layers, num_attention_heads=s.vision_heads,
                vocab_size=len(tokenizer), max_position_embeddings=s.text_len,
                pad_token_id=pad, bos_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                projection_size=s.vision_width)
    return SiglipConfig(vision_config=vision, text_config=text)


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor, or in newer transformers an output with pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def train_siglip(tokenizer, seed: int, settings: ToySettings):
    """SiglipModel trained with its own sigmoid loss; returns (model, quality dict)."""
    from transformers import SiglipModel

    s = settings
    scenes, texts = siglip_groups(seed, s.siglip_images, "pool", 2)
    read_scenes, read_texts = siglip_groups(seed, s.reading_images, "reading", s.reading_group, s.typeset)
    pixels = torch.from_numpy(np.stack([_square_pixels(sc, s.image_size) for sc in scenes + read_scenes]))
    captions, truncated = _caption_ids(tokenizer, texts + read_texts, s.text_len)
    torch.manual_seed(seed)
    model = SiglipModel(siglip_config(tokenizer, s)).train()
    with torch.no_grad():  # SigLIP's init: t' = log 10; its b = -10 is about -log of its
        model.logit_scale.fill_(math.log(10.0))  # 32k batch, scaled to ours
        model.logit_bias.fill_(-math.log(s.siglip_batch))
    # beta2 0.95 as SigLIP trained; small batches break the initial symmetry fastest here
    params = list(model.parameters())
    if s.caption_classification:
        word_head = torch.nn.Linear(s.vision_width, len(tokenizer))  # discarded after training
        params += list(word_head.parameters())
        words_NV = distinguishing_words(captions, [2] * (len(scenes) // 2)
                                        + [s.reading_group] * (len(read_scenes) // s.reading_group), len(tokenizer))
    opt = torch.optim.AdamW(params, lr=s.siglip_lr, betas=(0.9, 0.95), weight_decay=1e-4)
    schedule = _warmup_cosine(opt, s.siglip_steps)
    read_batch = s.reading_group * round(s.siglip_batch * s.reading_share / s.reading_group)
    pool_order = _group_batches(len(scenes) // 2, 2, s.siglip_batch - read_batch, s.siglip_steps, seed)
    read_order = _group_batches(len(read_scenes) // s.reading_group, s.reading_group, read_batch,
                                s.siglip_steps, seed + 1)
    losses = []
    for pool_idx, read_idx in zip(pool_order, read_order):
        idx = torch.cat([pool_idx, read_idx + len(scenes)])
        out = model(input_ids=captions[idx], pixel_values=_normalise(pixels[idx]), return_loss=True)
        loss = out.loss
        if s.caption_classification:
            logp_BV = word_head(out.vision_model_output.pooler_output).log_softmax(-1)
            loss = loss - s.caption_classification * (words_NV[idx] * logp_BV).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(out.loss.item())
    model.eval()
    quality = siglip_zero_shot(model, tokenizer, seed, s)
    quality.update(first_loss=round(losses[0], 4), last_loss=round(float(np.mean(losses[-20:])), 4),
                   truncated_captions=truncated, image_size=s.image_size)
    return model, quality


def distinguishing_words(ids_NL: torch.Tensor, group_sizes: list[int], vocab: int) -> torch.Tensor:
    """Per caption, the words it names that not every caption of its group (consecutive rows,
    ``group_sizes`` of them) names, as a uniform distribution over the vocabulary (rows with
    none: zeros): a reading sibling's digits or word, a shape twin's shape words. What the
    sigmoid loss asks the image tower to tell apart within a group, given to it as a label:
    at toy scale the two towers never start to tell a group apart on their own (4000 steps:
    sibling captions' text features at cosine 0.9997, large digits at chance)."""
    present_NV = torch.zeros(len(ids_NL), vocab).scatter_(1, ids_NL, 1.0)
    start = 0
    for size in group_sizes:
        group = present_NV[start:start + size]
        group -= group.min(0).values  # drop the words every caption of the group names
        start += size
    return present_NV / present_NV.sum(-1, keepdim=True).clamp(min=1)


def shape_twin(rng: np.random.Generator, scene: tw.Scene) -> tw.Scene:
    """The same scene (layout, sizes, colours, texts) with other distinct shapes."""
    while True:
        shapes = [str(x) for x in rng.choice(tw.SHAPES, size=len(scene.objects), replace=False)]
        if any(new != o.shape for new, o in zip(shapes, scene.objects)):
            return replace(scene, objects=tuple(replace(o, shape=new) for o, new in zip(scene.objects, shapes)))


def text_siblings(rng: np.random.Generator, scene: tw.Scene, k: int, tries: int = 50) -> list[tw.Scene] | None:
    """``k`` other versions of a one-text scene, each with another text of the same kind and
    length (all distinct), ink centred where the old ink was (same position word); None when
    fewer than ``k`` fit there."""
    (old,) = scene.texts
    cx, cy = (old.bbox[0] + old.bbox[2]) / 2, (old.bbox[1] + old.bbox[3]) / 2
    siblings, used = [], {old.text}
    for _ in range(tries):
        text = tw.reading_text(rng, old.kind)
        if text in used or len(text) != len(old.text):
            continue
        x0, y0, x1, y1 = tw.text_bbox(text, (0, 0), old.font_size)
        xy = (round(cx - (x0 + x1) / 2), round(cy - (y0 + y1) / 2))
        bbox = tw.text_bbox(text, xy, old.font_size)
        inside = bbox[0] >= 0 and bbox[1] >= 0 and bbox[2] <= scene.width and bbox[3] <= scene.height
        if inside and not any(tw._overlaps(bbox, o.bbox) for o in scene.objects):
            siblings.append(replace(scene, texts=(replace(old, text=text, bbox=bbox, xy=xy),)))
            used.add(text)
            if len(siblings) == k:
                return siblings
    return None


def siglip_groups(seed: int, n: int, kind: str, group: int, typeset: str = "small"
                  ) -> tuple[list[tw.Scene], list[str]]:
    """``n`` training scenes (rounded down to whole groups) and their captions, in groups of
    hard negatives: a "pool" scene and its shape twin (``group`` 2), or a "reading" scene (one
    large word or number, legible at the fixed size: what the toy learns to read from) and
    ``group`` - 1 text siblings. A group shares one caption phrasing, so its captions differ
    only where its images do."""
    scenes, captions, i = [], [], 0
    while len(scenes) < group * (n // group):
        if kind == "pool":
            scene = tw.pool_scene(tw.rng_for(seed, "toy-siglip", i))
            others = [shape_twin(tw.rng_for(seed, "toy-siglip-twin", i), scene)]
        else:
            rng = tw.rng_for(seed, "toy-siglip-read", i)
            scene = tw.reading_scene(rng, "number" if rng.random() < 0.5 else "word", typeset=typeset)
            others = text_siblings(tw.rng_for(seed, "toy-siglip-read-twin", i), scene, group - 1)
        if others is not None:
            scenes += [scene, *others]
            captions += [tw.short_caption(sc, tw.rng_for(seed, f"toy-siglip-caption-{kind}", i))
                         for sc in (scene, *others)]
        i += 1
    return scenes, captions


def _group_batches(groups: int, size: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``_batches`` over groups of ``size`` consecutive scenes: a batch holds whole groups."""
    return [(size * g[:, None] + torch.arange(size)).reshape(-1) for g in _batches(groups, batch // size, steps, seed)]


def _warmup_cosine(opt, steps: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)


def _batches(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index batches, epochs of a seeded permutation (a torch.Generator, so the data
    order never depends on the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    out, perm = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(perm) < batch:
            perm = torch.cat([perm, torch.randperm(n, generator=gen)])
        out.append(perm[:batch])
        perm = perm[batch:]
    return out


def class_prompts(attribute: str, label: str) -> list[str]:
    """Captions that state ``label`` and nothing else a scene of that class must show: a single
    shape in every caption form with every other attribute and every position filled in, or
    the digit / word alone in every text form at every position (CLIP-style prompt ensemble)."""
    positions = sorted({tw.position_word(x + 0.5, y + 0.5, 3, 3) for x in range(3) for y in range(3)})
    if attribute in tw.READING_PROBES:
        kind = "number" if attribute == "digit" else "word"
        return [f"{form(tw.Text(label, kind, p, (0, 0, 0, 0), (0, 0), 0))}." for form in tw.TEXT_FORMS
                for p in positions]
    colours = [label] if attribute == "colour" else list(tw.COLOURS)
    shapes = [label] if attribute == "shape" else list(tw.SHAPES)
    return [f"{form(tw.Shape(s, c, p, (0, 0, 0, 0)), '')}." for form in tw.SHAPE_FORMS
            for c in colours for s in shapes for p in positions]


# zero-shot sets: (attribute, large glyphs); the digit and word ones say whether the toy reads
# when the glyphs are large at its fixed size, and whether the squeeze of small ones defeats it
ZERO_SHOT_SETS = (("colour", False), ("shape", False), ("digit", True), ("word", True),
                  ("digit", False), ("word", False))


def _zero_shot_name(attribute: str, large: bool) -> str:
    return attribute + ("_large" if large else "_small" if attribute in tw.READING_PROBES else "")


@torch.no_grad()
def siglip_zero_shot(model, tokenizer, seed: int, settings: ToySettings) -> dict:
    """Zero-shot accuracy on probe scenes (held-out streams) at the fixed size: each image's
    class is the one whose mean normalised prompt embedding is nearest. Colour and shape;
    digit and word with large glyphs (reading scenes) and with the reading probes' small
    glyphs in large scenes."""
    result = {}
    for attribute, large in ZERO_SHOT_SETS:
        classes = tw.PROBES[attribute]
        class_CD = []
        for label in classes:
            text_ND = []
            prompts = class_prompts(attribute, label)
            for lo in range(0, len(prompts), 256):
                ids, _ = _caption_ids(tokenizer, prompts[lo:lo + 256], settings.text_len)
                text_ND.append(F.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1))
            class_CD.append(F.normalize(torch.cat(text_ND).mean(0), dim=-1))
        class_CD = torch.stack(class_CD)
        n = settings.probe_per_class * len(classes)
        labels = [i % len(classes) for i in range(n)]
        name = _zero_shot_name(attribute, large)
        stream = f"toy-zeroshot-{name}"
        pixels = np.stack([_square_pixels(tw.probe_scene(tw.rng_for(seed, stream, i), attribute,
                                                         classes[c], large, settings.typeset),
                                          settings.image_size)
                           for i, c in enumerate(labels)])
        image_ND = F.normalize(_features(model.get_image_features(
            pixel_values=_normalise(torch.from_numpy(pixels)))), dim=-1)
        pred = (image_ND @ class_CD.T).argmax(-1)
        accuracy = (pred == torch.tensor(labels)).float().mean().item()
        result[f"{name}_accuracy"] = round(accuracy, 4)
        result[f"{name}_chance"] = round(1 / len(classes), 4)
        result[f"{name}_images"] = n
    return result


def preprocessor_config(settings: ToySettings) -> dict:
    """google/siglip-*'s preprocessor_config.json at the toy resolution."""
    size = settings.image_size
    return {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
            "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


def save_siglip(model, tokenizer, settings: ToySettings, out: Path) -> Path:
    """Weights + config by save_pretrained, the preprocessor config and the text tower's
    tokenizer, as a google/siglip-* repository holds them."""
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(settings), indent=2) + "\n")
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- Qwen2


def qwen2_config(tokenizer, settings: ToySettings):
    from transformers import Qwen2Config

    s = settings
    padded_vocab = ((len(tokenizer) + 63) // 64) * 64  # Qwen pads its table, as tiny.py does
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return Qwen2Config(
        vocab_size=padded_vocab, hidden_size=s.lm_width, intermediate_size=4 * s.lm_width,
        num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads,
        num_key_value_heads=s.lm_kv_heads, max_position_embeddings=4096, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=eot,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=eot, use_sliding_window=False)


def _blocks(stream: torch.Tensor, length: int) -> torch.Tensor:
    n = len(stream) // length
    return stream[:n * length].view(n, length)


def train_lm(tokenizer, train_docs, heldout_docs, seed: int, settings: ToySettings):
    """Qwen2ForCausalLM trained with its own LM loss on packed blocks of the chat-format
    stream; returns (model, quality dict)."""
    from transformers import Qwen2ForCausalLM

    s = settings
    train_BL = _blocks(token_stream(tokenizer, train_docs), s.lm_block)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(tokenizer, s)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lm_lr, weight_decay=0.1)
    schedule = _warmup_cosine(opt, s.lm_steps)
    losses = []
    for idx in _batches(len(train_BL), s.lm_batch, s.lm_steps, seed):
        loss = model(input_ids=train_BL[idx], labels=train_BL[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    quality = lm_perplexity(model, train_BL, _blocks(token_stream(tokenizer, heldout_docs), s.lm_block),
                            len(tokenizer))
    quality.update(first_loss=round(losses[0], 4), last_loss=round(float(np.mean(losses[-20:])), 4),
                   train_tokens=train_BL.numel())
    return model, quality


@torch.no_grad()
def lm_perplexity(model, train_BL: torch.Tensor, heldout_BL: torch.Tensor, vocab: int) -> dict:
    """Perplexity on held-out blocks, and a unigram model's (add-one counts of the training
    blocks over the tokenizer's vocabulary) on the same predicted tokens (each block's 2nd on)."""
    nll, n = 0.0, 0
    for block in heldout_BL.split(16):
        logits = model(input_ids=block).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), block[:, 1:].reshape(-1),
                               reduction="sum").item()
        n += block[:, 1:].numel()
    counts = torch.bincount(train_BL.reshape(-1), minlength=vocab)[:vocab].double() + 1
    log_p = (counts / counts.sum()).log()
    unigram_nll = -log_p[heldout_BL[:, 1:].reshape(-1)].sum().item()
    return {"perplexity": round(math.exp(nll / n), 4),
            "unigram_perplexity": round(math.exp(unigram_nll / n), 4), "heldout_tokens": n}


def save_lm(model, tokenizer, out: Path) -> Path:
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

