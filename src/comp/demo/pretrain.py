"""Toy pre-training of the originals CoMP continues from: a two-tower SigLIP and a Qwen2 LM.

The real recipe starts from a SigLIP trained against text at one fixed square resolution and
from a pre-trained Qwen2.5; a demo that starts from random weights measures noise. Here both
are made as the real ones were, at toy scale, with transformers' own classes and losses:

- a tokenizer with one token per word (comp.demo.wordtok: Qwen2's byte-level BPE trained on
  toyworld text until every word is merged);
- ``SiglipModel`` trained with its sigmoid image-text loss (``return_loss=True``) on toyworld
  pool scenes and their short captions, every image resized to one square resolution (small
  text becomes illegible there, which native-resolution training should then recover); each
  batch holds scenes with their shape twins (same layout and colours, other shapes) as hard
  negatives: in toyworld colour alone tells a random batch's captions apart, and without twins
  the toy SigLIP never learns shape (docs/results/measurements.md);
- ``Qwen2ForCausalLM`` (tied embeddings, padded table) trained with its causal LM loss on
  toyworld text in the chat format: captions, dense captions, and questions answered from a
  scene's description (the LM never sees images, as a text LM).

Both are saved with ``save_pretrained`` (+ SigLIP's ``preprocessor_config.json``, Qwen2's
generation config and tokenizer), so the recipe loads them exactly as real checkpoints, and
cached under ``$COMP_CACHE/toy-pretrained/<key>/``: the key hashes the seed, the settings and
the source of the code that makes them. ``quality.json`` beside them says how good they are:
SigLIP zero-shot colour / shape accuracy on probe scenes (class texts ensembled over the
caption forms, as CLIP's prompt ensembles), LM perplexity on held-out text against a unigram
model's on the same tokens.

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
    text_len: int = 40  # captions padded / truncated to this many tokens, as SigLIP's 64
    siglip_images: int = 4000  # half of them the other half's shape twins
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
# For tests: seconds, not minutes; colour is learned, shape barely (docs/results/measurements.md).
QUICK = replace(FULL, text_scenes=400, heldout_scenes=40, image_size=84, siglip_images=800,
                siglip_steps=500, lm_steps=300, lm_batch=8, probe_per_class=12)


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
                    log=print) -> ToyOriginals:
    """The toy SigLIP and Qwen2 for ``seed``: read from the cache, else built there (in a
    temporary directory renamed into place, so a crash never leaves half a checkpoint and two
    concurrent builds both end with a complete one). ``cache_dir`` None:
    ``$COMP_CACHE/toy-pretrained`` (see comp.data.lengths.cache_root)."""
    from comp.data.lengths import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "toy-pretrained"
    final = root / cache_key(seed, settings)
    if not (final / QUALITY_FILE).exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_toys(tmp, seed, settings, log=log)
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished first: keep its (identical) build
                if not (final / QUALITY_FILE).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    quality = json.loads((final / QUALITY_FILE).read_text())
    return ToyOriginals(final / SIGLIP_DIR, final / QWEN2_DIR, quality)


def build_toys(out: Path, seed: int, settings: ToySettings, log=print) -> dict:
    """Tokenizer, SigLIP and Qwen2 for ``seed`` into ``out`` (siglip/, qwen2/, quality.json)."""
    out.mkdir(parents=True, exist_ok=True)
    quality: dict = {"seed": seed, "settings": asdict(settings), "seconds": {}}
    start = time.perf_counter()
    train_docs = text_documents(seed, "train", settings.text_scenes)
    tokenizer = train_tokenizer(train_docs)
    quality["vocab_size"] = len(tokenizer)
    quality["seconds"]["tokenizer"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    siglip, siglip_quality = train_siglip(tokenizer, seed, settings)
    save_siglip(siglip, tokenizer, settings, out / SIGLIP_DIR)
    quality["siglip"] = siglip_quality
    quality["seconds"]["siglip"] = round(time.perf_counter() - start, 2)
    log(f"toy SigLIP (seed {seed}): zero-shot colour {siglip_quality['colour_accuracy']:.3f}, "
        f"shape {siglip_quality['shape_accuracy']:.3f} in {quality['seconds']['siglip']:.0f} s")

    start = time.perf_counter()
    heldout_docs = text_documents(seed, "heldout", settings.heldout_scenes)
    lm, lm_quality = train_lm(tokenizer, train_docs, heldout_docs, seed, settings)
    save_lm(lm, tokenizer, out / QWEN2_DIR)
    quality["lm"] = lm_quality
    quality["seconds"]["lm"] = round(time.perf_counter() - start, 2)
    log(f"toy Qwen2 (seed {seed}): held-out perplexity {lm_quality['perplexity']:.2f} "
        f"(unigram {lm_quality['unigram_perplexity']:.2f}) in {quality['seconds']['lm']:.0f} s")
    (out / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
    return quality


# ----------------------------------------------------------------------------- text


def scene_conversations(rng: np.random.Generator, scene: tw.Scene) -> list[list[dict]]:
    """Chat conversations about one scene, as text: a caption and a dense caption asked for
    without context (the text prior of captions), and questions, a transcript, answered from
    the scene's dense description given in the user turn."""
    def user(text: str) -> dict:
        return {"role": "user", "content": text}

    def assistant(text: str) -> dict:
        return {"role": "assistant", "content": text}

    context = tw.dense_caption(scene)
    pairs = tw.qa_pairs(rng, scene)
    chosen = [pairs[int(i)] for i in rng.permutation(len(pairs))[:int(rng.integers(2, 5))]]
    qa = [user(f"{context}\n{chosen[0][0]}"), assistant(chosen[0][1])]
    for question, answer in chosen[1:]:
        qa += [user(question), assistant(answer)]
    convs = [[user(str(rng.choice(tw.CAPTION_PROMPTS))), assistant(tw.short_caption(scene))],
             [user(str(rng.choice(tw.DENSE_PROMPTS))), assistant(context)], qa]
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
    scenes = siglip_scenes(seed, s.siglip_images)
    pixels = torch.from_numpy(np.stack([_square_pixels(sc, s.image_size) for sc in scenes]))
    captions, truncated = _caption_ids(tokenizer, [tw.short_caption(sc) for sc in scenes], s.text_len)
    torch.manual_seed(seed)
    model = SiglipModel(siglip_config(tokenizer, s)).train()
    with torch.no_grad():  # SigLIP's init: t' = log 10; its b = -10 is about -log of its
        model.logit_scale.fill_(math.log(10.0))  # 32k batch, scaled to ours
        model.logit_bias.fill_(-math.log(s.siglip_batch))
    # beta2 0.95 as SigLIP trained; small batches break the initial symmetry fastest here
    opt = torch.optim.AdamW(model.parameters(), lr=s.siglip_lr, betas=(0.9, 0.95), weight_decay=1e-4)
    schedule = _warmup_cosine(opt, s.siglip_steps)
    order = _twin_batches(len(scenes) // 2, s.siglip_batch, s.siglip_steps, seed)
    losses = []
    for idx in order:
        out = model(input_ids=captions[idx], pixel_values=_normalise(pixels[idx]), return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        schedule.step()
        losses.append(out.loss.item())
    model.eval()
    quality = siglip_zero_shot(model, tokenizer, seed, s)
    quality.update(first_loss=round(losses[0], 4), last_loss=round(float(np.mean(losses[-20:])), 4),
                   truncated_captions=truncated, image_size=s.image_size)
    return model, quality


def shape_twin(rng: np.random.Generator, scene: tw.Scene) -> tw.Scene:
    """The same scene (layout, sizes, colours, texts) with other distinct shapes."""
    while True:
        shapes = [str(x) for x in rng.choice(tw.SHAPES, size=len(scene.objects), replace=False)]
        if any(new != o.shape for new, o in zip(shapes, scene.objects)):
            return replace(scene, objects=tuple(replace(o, shape=new) for o, new in zip(scene.objects, shapes)))


def siglip_scenes(seed: int, n: int) -> list[tw.Scene]:
    """``n`` training scenes: pool scenes at even indices, each one's shape twin after it."""
    scenes = []
    for i in range(n // 2):
        scene = tw.pool_scene(tw.rng_for(seed, "toy-siglip", i))
        scenes += [scene, shape_twin(tw.rng_for(seed, "toy-siglip-twin", i), scene)]
    return scenes


def _twin_batches(pairs: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``_batches`` over the (scene, twin) pairs: every batch holds both of each pair."""
    return [torch.stack([2 * p, 2 * p + 1], 1).reshape(-1) for p in _batches(pairs, batch // 2, steps, seed)]


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
    """The single-shape short captions that state ``label``: every other attribute and every
    position filled in (CLIP-style prompt ensemble over the caption forms)."""
    positions = sorted({tw.position_word(x + 0.5, y + 0.5, 3, 3) for x in range(3) for y in range(3)})
    colours = [label] if attribute == "colour" else list(tw.COLOURS)
    shapes = [label] if attribute == "shape" else list(tw.SHAPES)
    return [f"a {c} {s} {tw.position_phrase(p)}." for c in colours for s in shapes for p in positions]


@torch.no_grad()
def siglip_zero_shot(model, tokenizer, seed: int, settings: ToySettings) -> dict:
    """Zero-shot accuracy on probe scenes (held-out stream) for colour and shape: each image's
    class is the one whose mean normalised prompt embedding is nearest."""
    result = {}
    for attribute in ("colour", "shape"):
        classes = tw.PROBES[attribute]
        class_CD = []
        for label in classes:
            ids, _ = _caption_ids(tokenizer, class_prompts(attribute, label), settings.text_len)
            text = F.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1)
            class_CD.append(F.normalize(text.mean(0), dim=-1))
        class_CD = torch.stack(class_CD)
        n = settings.probe_per_class * len(classes)
        labels = [i % len(classes) for i in range(n)]
        stream = f"toy-zeroshot-{attribute}"
        pixels = np.stack([_square_pixels(tw.probe_scene(tw.rng_for(seed, stream, i), attribute,
                                                         classes[c]), settings.image_size)
                           for i, c in enumerate(labels)])
        image_ND = F.normalize(_features(model.get_image_features(
            pixel_values=_normalise(torch.from_numpy(pixels)))), dim=-1)
        pred = (image_ND @ class_CD.T).argmax(-1)
        accuracy = (pred == torch.tensor(labels)).float().mean().item()
        result[f"{attribute}_accuracy"] = round(accuracy, 4)
        result[f"{attribute}_chance"] = round(1 / len(classes), 4)
        result[f"{attribute}_images"] = n
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

