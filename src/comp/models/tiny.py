"""Tiny random checkpoints in genuine Hugging Face layout.

Tests and the demo load these through the ordinary ``from_pretrained`` code, exactly as a
user loads ``google/siglip-so400m-patch14-384`` or ``Qwen/Qwen2.5-0.5B-Instruct``: a
``config.json`` with the real ``model_type``, ``model.safetensors`` written by transformers'
own ``save_pretrained``, the family's ``preprocessor_config.json`` and, for Qwen2, a
byte-level BPE tokenizer built offline with the Qwen chat and vision special tokens.

Everything is deterministic for a seed (weights, tokenizer, configs).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.image_utils import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_STANDARD_MEAN,
                                      IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from transformers.utils import IMAGE_PROCESSOR_NAME

from comp.models.weights import save_hf_model
from comp.tokens import CHAT_TEMPLATE_PATH, END_OF_TEXT, IM_END, IM_START, VISION_TOKENS

KINDS = ("siglip", "dinov2", "aimv2", "qwen2")

# Normalisation constants of the real checkpoints' preprocessor configs (transformers' names).
SIGLIP_MEAN_STD = (list(IMAGENET_STANDARD_MEAN), list(IMAGENET_STANDARD_STD))
IMAGENET_MEAN_STD = (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
CLIP_MEAN_STD = (list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD))

# Qwen2.5 specials in their real order (ids 151643.. in the real vocabulary).
QWEN_SPECIAL_TOKENS = (
    END_OF_TEXT, IM_START, IM_END,
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", *VISION_TOKENS,
)

# Same pre-tokenisation regex as the real Qwen2 tokenizer.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)



def _vision_dims(seed_image_size: int = 56) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=seed_image_size, patch_size=14)


def _image_preprocessor(kind: str, size: int) -> dict:
    mean, std = {"siglip": SIGLIP_MEAN_STD, "dinov2": IMAGENET_MEAN_STD,
                 "aimv2": CLIP_MEAN_STD}[kind]
    cls = {"siglip": "SiglipImageProcessor", "dinov2": "BitImageProcessor",
           "aimv2": "CLIPImageProcessor"}[kind]
    cfg = {"image_processor_type": cls, "do_normalize": True, "do_rescale": True,
           "rescale_factor": 1 / 255, "image_mean": mean, "image_std": std,
           "resample": 3, "do_convert_rgb": True}
    if kind == "siglip":
        cfg.update(do_resize=True, size={"height": size, "width": size}, resample=2)
    else:
        cfg.update(do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
                   crop_size={"height": size, "width": size})
    return cfg


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tiny_vision(out: str | Path, kind: str, seed: int = 0, image_size: int = 56) -> Path:
    """Write a tiny SigLIP (full two-tower ``SiglipModel``, as the real So400M repo),
    DINOv2 (``Dinov2Model``) or AIMv2 (``Aimv2VisionModel``) checkpoint."""
    import transformers as tf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dims = _vision_dims(image_size)
    if kind == "siglip":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, vocab_size=128, max_position_embeddings=16,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=dims, text_config=text))
    elif kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**dims, layerscale_value=0.5))
    elif kind == "aimv2":
        model = tf.Aimv2VisionModel(tf.Aimv2VisionConfig(**dims))
    else:
        raise ValueError(f"unknown vision kind {kind!r}; expected siglip, dinov2 or aimv2")
    _randomise_(model, seed)
    save_hf_model(model, out)
    _write_json(out / IMAGE_PROCESSOR_NAME, _image_preprocessor(kind, image_size))
    return out


def _randomise_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (norm gains, biases, layer scales included) non-trivial random
    values, so that parity tests would notice a parameter that is loaded but unused."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("weight") and param.dim() == 1:  # norm gains around 1
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise if param.dim() > 1 else 0.02 * noise)


def _tokenizer_corpus() -> list[str]:
    words = (
        "the a an of and in on to is are with image picture photo shows there this that "
        "red green blue yellow orange purple black white gray pink brown cyan "
        "circle square triangle star cross ring dot line shape shapes text word number "
        "left right top bottom center middle upper lower corner small large big tiny "
        "what where how many which color colour describe caption answer question read "
        "zero one two three four five six seven eight nine ten "
        "user assistant system you are helpful "
    ).split()
    lines = []
    for i, w in enumerate(words):
        lines.append(" ".join(words[(i * 7 + k) % len(words)] for k in range(12)))
    lines += [str(n) for n in range(100)]
    lines += ["Hello, world! How are you? I'm fine: 3.14 + 2 = 5.14\n"] * 3
    return lines


def qwen_bpe_tokenizer(texts, vocab_size: int, *, nfc: bool = False):
    """A tokenizer in Qwen2's own format (byte-level BPE with Qwen's pre-tokenisation regex and
    specials, the CoMP chat template, ``<|im_end|>`` eos, ``<|endoftext|>`` pad, no unknown
    token) trained on ``texts``; ``nfc`` adds Qwen2's NFC normaliser. AutoTokenizer reloads it
    as a Qwen2Tokenizer unchanged."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=IM_END,
        pad_token=END_OF_TEXT, unk_token=None, model_max_length=32768,
        clean_up_tokenization_spaces=False, split_special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE_PATH.read_text()
    return fast


def build_tiny_tokenizer(vocab_size: int = 512):
    """A Qwen2-style byte-level BPE tokenizer trained offline on a fixed corpus."""
    return qwen_bpe_tokenizer(_tokenizer_corpus(), vocab_size)


def write_tiny_qwen2(out: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2 causal LM (tied embeddings like Qwen2.5-0.5B, padded embedding table)."""
    import transformers as tf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    n_tok = len(tokenizer)
    padded_vocab = ((n_tok + 63) // 64) * 64  # Qwen pads its table (151,936 rows for 151,665 tokens)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, IM_END)}
    config = tf.Qwen2Config(
        vocab_size=padded_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=ids[END_OF_TEXT], eos_token_id=ids[IM_END],
        pad_token_id=ids[END_OF_TEXT], use_sliding_window=False)
    torch.manual_seed(seed)
    model = tf.Qwen2ForCausalLM(config)
    _randomise_(model, seed)
    save_hf_model(model, out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_tiny(out: str | Path, kind: str, seed: int = 0) -> Path:
    if kind == "qwen2":
        return write_tiny_qwen2(out, seed)
    if kind in ("siglip", "dinov2", "aimv2"):
        return write_tiny_vision(out, kind, seed)
    raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def build_parser():
    from comp.cliargs import ArgumentParser

    parser = ArgumentParser(prog="comp tiny", description=__doc__.splitlines()[0])
    parser.add_out("output directory")
    parser.add_argument("--kind", required=True, choices=KINDS, help="which model family")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    from comp.errors import UserError
    from comp.files import atomic_output

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    with atomic_output(out, directory=True) as tmp:
        write_tiny(tmp, args.kind, args.seed)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and _contents(out) != _contents(tmp):
            raise UserError("--out already holds something else (a checkpoint, a training output?)", out,
                            "name a new or empty directory; comp tiny writes over nothing but the "
                            "same tiny checkpoint")
    print(f"wrote tiny {args.kind} checkpoint to {out}")
    return 0


def _contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


