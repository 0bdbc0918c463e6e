"""CoMP-MM: vision encoder -> 2x2 merger -> Qwen2.5 with multimodal RoPE.

The LLM is transformers' Qwen2-VL text model (the same decoder as Qwen2/Qwen2.5, with
M-RoPE), so a Qwen2.5 checkpoint's ``model.*`` / ``lm_head.*`` tensors load unchanged and,
on text alone, logits equal ``Qwen2ForCausalLM``'s. The encoder (with its merger) lives under
``visual.``; its parameter names are those of the original SigLIP / DINOv2 / AIMv2 checkpoint.

Two classes, as transformers' ``Qwen2_5_VLModel`` / ``...ForConditionalGeneration``:
- ``CompModel``, the base model: embeddings, image features dropped into the
  ``<|image_pad|>`` positions, M-RoPE positions (packed rows included) and the decoder; it
  returns hidden states.
- ``CompForConditionalGeneration``, the heads: the LM head with the next-token loss, the
  alignment loss, and generation through transformers' ``GenerationMixin``.

The heads *extend* the base model (a subclass adding ``lm_head``) instead of holding it as a
submodule, so that the state-dict keys stay ``visual.*``, ``model.*`` (the text decoder) and
``lm_head.*`` (``base_model_prefix = ""``). A ``self.model = CompModel(...)`` would rename
every key to ``model.visual.*`` / ``model.model.*``: saved CoMP-MM checkpoints, the Qwen2.5
weight loading, the reference-checkpoint key maps (comp.models.convert), the tied-weight
declaration and ZeRO-3 parameter names would all need a key conversion for nothing.
``CompModel.from_pretrained`` of a CoMP-MM directory loads the same tensors minus the head.

Training returns two losses: next-token prediction over the supervised tokens (chunked, the
[tokens, vocab] logits are never built) and the alignment loss of comp.models.alignment.

Generation: GenerationMixin runs the loop (greedy, sampling, beam search, logits processors,
stopping criteria, streamers). Positions are prepared once for the prompt as ``[4, B, L]``
(the text positions from which the decoder builds its mask, then the three M-RoPE rows) and
grown by one text position per new token; a new M-RoPE position continues after the row's
highest one, which is the row's ``rope_delta`` carried forward (image spans advance the
position by less than their token count). Pixels go in on the first step only.

Shape legend: B rows, L tokens per row, D LLM width, V vocabulary rows, T encoder patches,
M merged visual tokens of the batch, N images, S samples (= B unless rows are packed).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel
from transformers.utils import ModelOutput, can_return_tuple

from comp.files import file_sha256
from comp.hub import resolve_model_dir
from comp.models.alignment import (UNIFORM_PRIOR, alignment_loss, log_word_prior, masked_mean_pool,
                                   pool_image_features)
from comp.models.configuration import DEFAULT_VOCAB_ROWS, VOCAB_ROWS, CompConfig, text_config_from_qwen2
from comp.models.losses import chunked_causal_lm_loss
from comp.models.positions import get_mrope_position_ids, packed_mrope_position_ids
from comp.models.vision.configuration import CompVisionConfig
from comp.models.vision.loading import saved_merger_width
from comp.models.vision.model import CompVisionModel
from comp.models.weights import load_state_dict, no_progress_bars, normal_permissions
from comp.tokens import IMAGE_PAD, config_token_ids, ensure_vision_tokens, stop_ids

logger = logging.getLogger(__name__)

# The private GenerationMixin methods CompForConditionalGeneration overrides (GenerationMixin
# has no public hook for these), with their parameters in the versions this was checked
# against (transformers 5.24-5.25) and why. tests/test_trainer_contract.py fails when an
# override is missing here or an entry no longer matches transformers.
GENERATION_HOOKS: dict[str, tuple[tuple[str, ...], str]] = {
    "_prepare_position_ids_for_generation": (
        ("self", "inputs_tensor", "model_kwargs"),
        "the prompt's [4, B, L] positions: text positions on the M-RoPE ids of its images"),
    "_update_model_kwargs_for_generation": (
        ("self", "outputs", "model_kwargs", "is_encoder_decoder", "num_new_tokens"),
        "each new token's positions continue after its row's highest M-RoPE position"),
    "_expand_inputs_for_generation": (
        ("self", "expand_size", "is_encoder_decoder", "input_ids", "model_kwargs"),
        "beam search / several sequences: pixels and grids are per image, repeated row by row"),
}


@dataclass
class CompModelOutput(ModelOutput):
    """The base model's output. ``image_features`` [M, D] / ``image_grid_thw`` [N, 3]: the
    merged visual tokens of the batch and their grids (in training without images, those of
    the zero dummy image), for the alignment loss."""

    last_hidden_state: torch.Tensor | None = None
    cache: object | None = None
    image_features: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


@dataclass
class CompOutput(ModelOutput):
    """The heads' output: the losses in training, else logits and the KV cache."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    align_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None


class CompLMHead(nn.Linear):
    """The LM head. With labels it returns, instead of logits, the losses that read the word
    embeddings: the chunked next-token loss and, given ``alignment``, the alignment loss,
    whose prototypes are this weight's rows.

    Both run inside this module's forward because under ZeRO-3 ``weight`` (tied to the input
    embeddings) is whole only there and in its backward; gathering it anywhere else, even
    with ``deepspeed.zero.GatheredParameters``, fails. ``lm_head.weight`` keeps its name."""

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, *,
                chunk_size: int = 4096, reduction: str = "mean",
                alignment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Logits without labels; with labels ``(lm_loss, alignment(weight) or None)``."""
        if labels is None:
            return super().forward(hidden)
        lm_loss = chunked_causal_lm_loss(hidden, self.weight, labels, chunk_size=chunk_size,
                                         reduction=reduction, lm_head_bias_V=self.bias)
        return lm_loss, None if alignment is None else alignment(self.weight)


class CompPreTrainedModel(PreTrainedModel):
    config_class = CompConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Qwen2VLDecoderLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading, after ``comp.hub`` resolved a Hub id (``org/name[@rev]``) to
        its cached snapshot, so ids resolve the same way as in every other CoMP loader."""
        path = resolve_model_dir(pretrained_model_name_or_path, kwargs.pop("revision", None))
        with no_progress_bars():  # a bar per load is noise for checkpoints this size
            return super().from_pretrained(path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs):
        """transformers' saving, quiet, with normal permissions on the weight files (safetensors
        writes them 0600); also when ``state_dict`` comes from an engine (DeepSpeed ZeRO-2
        hands distinct copies of tied tensors, which the de-duplication by storage misses):
        a tied tensor is never written twice, whatever engine saved it."""
        tied = getattr(self, "_tied_weights_keys", None) or {}
        if state_dict is not None and self.config.tie_word_embeddings:
            state_dict = {k: v for k, v in state_dict.items() if k not in tied}
        with no_progress_bars():
            result = super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        if Path(save_directory).is_dir():
            normal_permissions(*Path(save_directory).glob("*.safetensors"))
        return result


class CompModel(CompPreTrainedModel):
    """The base model: the encoder with its merger (``visual``) and the text decoder
    (``model``); ``forward`` returns the decoder's hidden states."""

    def __init__(self, config: CompConfig):
        super().__init__(config)
        self.visual = CompVisionModel(config.vision_config)
        self.model = Qwen2VLTextModel(config.text_config)
        self._add_heads(config)
        self.post_init()

    def _add_heads(self, config: CompConfig) -> None:
        """Modules of subclasses, added before ``post_init`` (the base model has none)."""

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged visual tokens ``[M, D]`` in the order of the image pads."""
        return self.visual(pixel_values.to(self.visual.dtype), image_grid_thw)

    def _dummy_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged features and grid of one 2x2-merge-window image of zeros: a training batch
        without images still calls every vision parameter (and the alignment text pass), so
        ZeRO-3 gathers stay in step across ranks and DDP sees every parameter used."""
        vc = self.config.vision_config
        m = self.config.spatial_merge_size
        pixels = torch.zeros(m * m, vc.num_channels * vc.patch_size ** 2,
                             device=self.get_input_embeddings().weight.device, dtype=self.visual.dtype)
        grid = torch.tensor([[1, m, m]], device=pixels.device)
        return self.visual(pixels, grid), grid

    def insert_image_features(self, input_ids_BL, embeds_BLD, feats_MD, record_ids=None):
        """Put the merged features into the ``<|image_pad|>`` positions (counts must agree)."""
        mask_BL = input_ids_BL == self.config.image_token_id
        per_row = mask_BL.sum(1)
        if int(per_row.sum()) != feats_MD.shape[0]:
            raise ValueError(_mismatch_message(per_row, feats_MD.shape[0], record_ids))
        return embeds_BLD.masked_scatter(mask_BL.unsqueeze(-1), feats_MD.to(embeds_BLD.dtype))

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, record_ids: list[str] | None = None,
                cu_seqlens: list[torch.Tensor] | None = None, cache=None,
                use_cache: bool | None = None) -> CompModelOutput:
        """Hidden states ``[B, L, D]`` of the prompt with its images.

        ``position_ids``: ``[3, B, L]`` M-RoPE ids or ``[4, B, L]`` with the text positions
        first (as generation passes them); computed from ``attention_mask`` and the image
        grids when absent. ``cu_seqlens``: per row, the sample boundaries of packed rows (see
        comp.data.collator); positions then restart at each sample and attention stays inside
        it. ``record_ids``: the rows' record ids, named when image pads and images disagree.
        """
        embeds_BLD = self.model.embed_tokens(input_ids)
        feats_MD, grid_N3 = None, image_grid_thw
        if _has_images(pixel_values, image_grid_thw):
            feats_MD = self.image_features(pixel_values, image_grid_thw)
            embeds_BLD = self.insert_image_features(input_ids, embeds_BLD, feats_MD, record_ids)
        elif self.training:
            feats_MD, grid_N3 = self._dummy_image()
            embeds_BLD = embeds_BLD + 0.0 * feats_MD.sum()

        if cu_seqlens is not None:
            position_ids = self.packed_position_ids(input_ids, image_grid_thw, cu_seqlens)
            attention_mask = None  # the decoder derives per-sample causal masks from row 0
        elif position_ids is None:
            position_ids, _ = self.position_ids(input_ids, image_grid_thw, attention_mask)
        out = self.model(inputs_embeds=embeds_BLD, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=bool(use_cache))
        return CompModelOutput(last_hidden_state=out.last_hidden_state, cache=out.cache,
                               image_features=feats_MD, image_grid_thw=grid_N3)

    def position_ids(self, input_ids_BL, image_grid_thw_N3=None, attention_mask_BL=None):
        """M-RoPE ids ``[3, B, L]`` and per-row deltas ``[B, 1]`` (Qwen2-VL rules)."""
        return get_mrope_position_ids(
            input_ids_BL, image_grid_thw_N3, attention_mask_BL,
            image_token_id=self.config.image_token_id,
            vision_start_token_id=self.config.vision_start_token_id,
            spatial_merge_size=self.config.spatial_merge_size)

    def packed_position_ids(self, input_ids_BL, image_grid_thw_N3, cu_seqlens) -> torch.Tensor:
        """``[4, B, L]``: the per-sample text positions (from which the decoder builds its
        block-causal mask) stacked on the M-RoPE ids; every packed sample starts at 0."""
        grids = self._images_per_row(input_ids_BL, image_grid_thw_N3)
        rows = []
        for ids_L, grid_N3, cu_S1 in zip(input_ids_BL, grids, cu_seqlens):
            mrope_3L = packed_mrope_position_ids(
                ids_L, grid_N3 if grid_N3 is not None and len(grid_N3) else None, cu_S1,
                image_token_id=self.config.image_token_id,
                vision_start_token_id=self.config.vision_start_token_id,
                spatial_merge_size=self.config.spatial_merge_size)
            text_L = _restarting_arange(cu_S1.to(ids_L.device).long(), ids_L.numel())
            rows.append(torch.cat([text_L[None], mrope_3L]))
        return torch.stack(rows, dim=1)

    def _images_per_row(self, input_ids_BL, image_grid_thw_N3) -> list[torch.Tensor | None]:
        """The grids of each row's images (one ``<|vision_start|>`` per image)."""
        counts = (input_ids_BL == self.config.vision_start_token_id).sum(1).tolist()
        if image_grid_thw_N3 is None:
            return [None] * len(counts)
        return list(torch.split(image_grid_thw_N3, counts))


class CompForConditionalGeneration(CompModel, GenerationMixin):
    """The CoMP multimodal LLM: the base model plus the LM head, the losses and generation.
    Build it from parts with :meth:`from_components`, or load a saved one with
    ``from_pretrained``."""

    accepts_loss_kwargs = True  # Trainer passes step-global token counts (see forward)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def _add_heads(self, config: CompConfig) -> None:
        self.lm_head = CompLMHead(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.log_word_prior_K: torch.Tensor | None = None

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_components(cls, llm_dir: str | Path, vision_dir: str | Path, *, tokenizer=None,
                        use_rope: bool | None = None, dtype: torch.dtype | None = None,
                        vocab_rows: str = DEFAULT_VOCAB_ROWS, new_merger: bool = False,
                        **config_overrides) -> "CompForConditionalGeneration":
        """A CoMP-MM from a Qwen2/Qwen2.5 checkpoint and any encoder ``CompVisionModel``
        loads (directories or Hub ids, see ``comp.hub``) (original SigLIP / DINOv2 / AIMv2 or a
        CoMP-VFM). The merger starts random, unless the encoder directory holds one that fits
        the LLM (loaded, as the reference loads it; ``new_merger=True`` starts a new one).
        The LLM tokenizer gets any missing vision tokens appended. ``vocab_rows``: "tokenizer"
        resizes the word embeddings to ``len(tokenizer)`` as the reference does (Qwen2.5:
        151,936 -> 151,665 rows; the checkpoint loads unchanged first), "llm" keeps the LLM's
        padded table (grown only when the tokenizer is longer).
        ``use_rope`` None: CompVisionConfig's default (C-RoPE on)."""
        from transformers import AutoTokenizer

        llm_dir, vision_dir = resolve_model_dir(llm_dir), resolve_model_dir(vision_dir)
        qwen2_config = AutoConfig.from_pretrained(llm_dir)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        ensure_vision_tokens(tokenizer)
        if use_rope is None:
            use_rope = CompVisionConfig.use_rope
        saved = saved_merger_width(vision_dir)
        if saved and saved != qwen2_config.hidden_size:
            logger.info("%s: its merger (width %d) does not fit this LLM (width %d); a new one starts",
                        vision_dir, saved, qwen2_config.hidden_size)
        visual = CompVisionModel.from_pretrained(
            vision_dir, use_rope=use_rope, w_merger=qwen2_config.hidden_size,
            new_merger=new_merger or saved != qwen2_config.hidden_size)
        config = CompConfig(
            vision_config=visual.config, text_config=text_config_from_qwen2(qwen2_config),
            tie_word_embeddings=bool(getattr(qwen2_config, "tie_word_embeddings", False)),
            num_prototypes=len(tokenizer), **config_token_ids(tokenizer), **config_overrides)
        model = cls(config)
        model.visual.load_state_dict(visual.state_dict())
        model._load_llm_weights(llm_dir)
        model.resize_vocab(len(tokenizer), vocab_rows)
        model.generation_config = generation_config_for(llm_dir, tokenizer)
        if dtype is not None:
            model.to(dtype)
        return model

    def _load_llm_weights(self, llm_dir: Path) -> None:
        state = load_state_dict(llm_dir)
        wanted = {k: v for k, v in state.items() if k.startswith(("model.", "lm_head."))}
        if "lm_head.weight" not in wanted and self.config.tie_word_embeddings:
            wanted["lm_head.weight"] = wanted["model.embed_tokens.weight"]
        own = {k for k in self.state_dict() if not k.startswith("visual.")}
        missing = sorted(own - set(wanted))
        if missing:
            raise ValueError(f"{llm_dir}: the LLM checkpoint lacks {len(missing)} tensors, e.g. "
                             f"{missing[:5]}; is it a Qwen2/Qwen2.5 causal LM?")
        self.load_state_dict(wanted, strict=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        if type(value) is nn.Linear:  # transformers' resizing of an untied head builds a plain Linear
            value.__class__ = CompLMHead
        self.lm_head = value

    def resize_vocab(self, num_tokens: int, vocab_rows: str = DEFAULT_VOCAB_ROWS) -> None:
        """Word-embedding rows for a tokenizer of ``num_tokens``: exactly that many ("tokenizer",
        the reference's ``resize_token_embeddings(len(tokenizer))``) or the current table, grown
        when too short ("llm"). New rows start at the mean of the old ones; under ZeRO-3
        transformers gathers the partitioned table. The alignment prototypes are those rows."""
        if vocab_rows not in VOCAB_ROWS:
            raise ValueError(f"vocab_rows must be one of {VOCAB_ROWS}, got {vocab_rows!r}")
        rows = self.get_input_embeddings().weight.shape[0]
        if hasattr(self.get_input_embeddings().weight, "ds_shape"):  # ZeRO-3: the full shape
            rows = self.get_input_embeddings().weight.ds_shape[0]
        want = target_rows(num_tokens, rows, vocab_rows)
        if want != rows:
            self.resize_token_embeddings(want, mean_resizing=want > rows)
        self.config.num_prototypes = num_tokens

    @property
    def num_prototypes(self) -> int:
        """Alignment prototypes: the tokenizer's rows of the word embeddings. The padding rows
        of Qwen's table (151,936 rows for 151,665 tokens) are no words and stay out."""
        return self.config.num_prototypes or self.config.text_config.vocab_size

    def set_word_prior(self, source: str | Path | torch.Tensor | list | None, *,
                       pad: bool | None = None) -> None:
        """The word-frequency prior u of the alignment target: counts (or a counts file, see
        ``comp data prior``) over the tokenizer's vocabulary, one per prototype, or "uniform".
        A file's path and checksum go into the config (``word_prior_source`` / ``_sha256``)."""
        self.log_word_prior_K = log_word_prior(source, self.num_prototypes, self.config.word_temp, pad=pad)
        if isinstance(source, (str, Path)):
            uniform = str(source) == UNIFORM_PRIOR
            self.config.word_prior_source = UNIFORM_PRIOR if uniform else str(Path(source).resolve())
            self.config.word_prior_sha256 = None if uniform else file_sha256(source)
        else:
            self.config.word_prior_source, self.config.word_prior_sha256 = "in-memory counts", None

    # ------------------------------------------------------------------------------ forward
    @can_return_tuple
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                align_input_ids: torch.Tensor | None = None,
                align_attention_mask: torch.Tensor | None = None,
                image_sample_index: torch.Tensor | None = None, record_ids: list[str] | None = None,
                cu_seqlens: list[torch.Tensor] | None = None, cache=None, use_cache: bool | None = None,
                logits_to_keep: int = 0, lm_loss_normalizer: torch.Tensor | float | None = None,
                align_normalizer: torch.Tensor | float | None = None) -> CompOutput:
        """Training (``labels`` given): returns ``loss`` = lm_loss + loss_weight * align_loss and
        the parts, no logits. Inference: logits of the last ``logits_to_keep`` positions (all
        if 0) and the KV cache (``cache``, with ``use_cache``).

        ``align_input_ids`` / ``align_attention_mask`` [S, L_t]: each sample's answers, shuffled
        and joined (the F_t text of the alignment loss). ``image_sample_index`` [N]: sample of
        each image, needed only when several samples are packed into one row.
        ``lm_loss_normalizer`` / ``align_normalizer``: divide the summed LM loss / alignment
        loss by these global counts (supervised tokens / image samples of the whole optimizer
        step, see comp.train.trainer) instead of averaging over this batch. The other inputs
        are those of :meth:`CompModel.forward`.
        """
        base = super().forward(input_ids, attention_mask, position_ids, pixel_values, image_grid_thw,
                               record_ids, cu_seqlens, cache, use_cache, return_dict=True)
        hidden_BLD = base.last_hidden_state
        if labels is None:
            keep = hidden_BLD[:, -logits_to_keep:] if logits_to_keep else hidden_BLD
            return CompOutput(logits=self.lm_head(keep), cache=base.cache)

        alignment = None
        if self.config.use_alignment_loss and align_input_ids is not None and base.image_features is not None:
            alignment = self._alignment_term(
                base.image_features, base.image_grid_thw, input_ids, image_sample_index,
                align_input_ids, align_attention_mask, align_normalizer,
                dummy_image=not _has_images(pixel_values, image_grid_thw))
        lm_loss, align = self.lm_head(hidden_BLD, labels, chunk_size=self.config.lm_loss_chunk_size,
                                      reduction="mean" if lm_loss_normalizer is None else "sum",
                                      alignment=alignment)
        if lm_loss_normalizer is not None:
            lm_loss = lm_loss / lm_loss_normalizer
        loss = lm_loss if align is None else lm_loss + self.config.loss_weight * align
        return CompOutput(loss=loss, lm_loss=lm_loss.detach(),
                          align_loss=None if align is None else align.detach())

    def _alignment_term(self, feats_MD, grid_N3, input_ids_BL, image_sample_index_N,
                        align_ids_SL, align_mask_SL, normalizer=None, *,
                        dummy_image: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """The alignment loss as a function of the word embeddings, for the LM head to call
        (see CompLMHead). Every rank runs the same calls (text pass, prototypes) whether or not
        its batch has images; with only the dummy image no sample takes part and the term is 0."""
        num_samples = align_ids_SL.shape[0]
        if dummy_image:
            image_sample_index_N = torch.zeros(1, dtype=torch.long, device=grid_N3.device)
        elif image_sample_index_N is None:
            images_per_row = (input_ids_BL == self.config.vision_start_token_id).sum(1)
            image_sample_index_N = torch.repeat_interleave(
                torch.arange(input_ids_BL.shape[0], device=input_ids_BL.device), images_per_row)
        tokens_per_image = grid_N3.prod(-1) // self.config.spatial_merge_size ** 2
        sample_index_M = torch.repeat_interleave(image_sample_index_N.to(grid_N3.device), tokens_per_image)
        f_v_SD, has_image_S = pool_image_features(feats_MD, sample_index_M, num_samples)
        with torch.no_grad():
            text_SLD = self.model(input_ids=align_ids_SL, attention_mask=align_mask_SL,
                                  use_cache=False).last_hidden_state
            f_t_SD = masked_mean_pool(text_SLD.float(), align_mask_SL)
        keep_S = has_image_S & (align_mask_SL.sum(1) > 0).to(has_image_S.device) & (not dummy_image)
        return partial(self._alignment_loss, f_v_SD, f_t_SD, keep_S, normalizer)

    def _alignment_loss(self, f_v_SD, f_t_SD, keep_S, normalizer, words_VD) -> torch.Tensor:
        if words_VD.shape[0] < self.num_prototypes:
            raise ValueError(f"the word embeddings have {words_VD.shape[0]} rows but the tokenizer "
                             f"{self.num_prototypes} tokens; resize them (model.resize_vocab(len(tokenizer)))")
        mean = alignment_loss(
            f_v_SD.float(), f_t_SD, words_VD[:self.num_prototypes], self._log_prior(), keep_S,
            embed_temp=self.config.embed_temp, word_eps=self.config.word_eps,
            iters=self.config.sinkhorn_iters, mode=self.config.prior_mode)
        return mean if normalizer is None else mean * keep_S.sum() / normalizer

    def _log_prior(self) -> torch.Tensor:
        if self.log_word_prior_K is None:  # raises, with the hint how to get a prior
            self.set_word_prior(None)
        return self.log_word_prior_K.to(self.lm_head.weight.device)

    # ---------------------------------------------------------------------------- generation
    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs) -> torch.Tensor:
        """The prompt's ``[4, B, L]`` positions: text positions (for the decoder's mask) on the
        M-RoPE ids of the prompt and its images."""
        text_BL = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        input_ids_BL = model_kwargs.get("input_ids", inputs_tensor)
        mrope_3BL, _ = self.position_ids(input_ids_BL, model_kwargs.get("image_grid_thw"),
                                         model_kwargs.get("attention_mask"))
        return torch.cat([text_BL.expand_as(input_ids_BL)[None].to(mrope_3BL), mrope_3BL])

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens: int = 1):
        """transformers' update; the positions of the new (text) tokens as the module docstring says."""
        position_ids = model_kwargs.pop("position_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens)
        if position_ids is not None:
            model_kwargs["position_ids"] = _append_text_positions(position_ids, num_new_tokens)
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.Tensor | None = None, **model_kwargs):
        """Rows repeated ``expand_size`` times (beam search, several sequences per prompt), each
        with its own images: pixels and grids are per image, not per row, so transformers'
        row-wise repeat would scramble them."""
        pixels, grid = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_grid_thw", None)
        if expand_size > 1 and _has_images(pixels, grid):
            pixels, grid = self._repeat_row_images(input_ids, pixels, grid, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids,
            **model_kwargs)
        return input_ids, dict(model_kwargs, pixel_values=pixels, image_grid_thw=grid)

    def _repeat_row_images(self, input_ids_BL, pixels_TD, grid_N3, times: int):
        """Pixels and grids with every row's images repeated ``times`` times, row after row."""
        grids = self._images_per_row(input_ids_BL, grid_N3)
        patches = torch.split(pixels_TD, [int(g.prod(-1).sum()) for g in grids])
        return (torch.cat([p for p in patches for _ in range(times)]),
                torch.cat([g for g in grids for _ in range(times)]))


def target_rows(num_tokens: int, rows: int, vocab_rows: str) -> int:
    """Embedding rows for a tokenizer of ``num_tokens`` when the table has ``rows`` (see
    ``resize_vocab``)."""
    return num_tokens if vocab_rows == "tokenizer" else max(rows, num_tokens)


def generation_config_for(llm_dir: str | Path, tokenizer) -> GenerationConfig:
    """The CoMP-MM's generation defaults: the LLM's bos, stop at the end of the assistant turn
    or the end of text (comp.tokens.stop_ids), pad with the tokenizer's pad, greedy.

    Only the LLM's token ids carry over: its decoding defaults (Qwen2.5-Instruct samples with
    temperature 0.7, top-p 0.8, top-k 20 and a repetition penalty of 1.05) belong to the chat
    LLM, and would silently turn every plain ``generate`` of this model into sampling."""
    try:
        llm = GenerationConfig.from_pretrained(llm_dir)
    except OSError:  # an LLM directory without generation_config.json
        llm = GenerationConfig()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else llm.pad_token_id
    return GenerationConfig(bos_token_id=llm.bos_token_id, eos_token_id=stop_ids(tokenizer),
                            pad_token_id=pad)


def _mismatch_message(tokens_per_row, num_features: int, record_ids) -> str:
    rows = ", ".join(
        f"{record_ids[i] if record_ids else f'row {i}'}: {int(n)} image tokens"
        for i, n in enumerate(tokens_per_row.tolist()))
    return (f"the batch has {int(tokens_per_row.sum())} {IMAGE_PAD} tokens but the encoder "
            f"produced {num_features} merged features ({rows}); each image needs exactly "
            "(h/2)*(w/2) pads - build prompts with CompProcessor, which expands them per image")


def _restarting_arange(cu_S1: torch.Tensor, length: int) -> torch.Tensor:
    """0, 1, ... restarting at every boundary of ``cu_S1``; padding after the last is 0."""
    index_L = torch.arange(length, device=cu_S1.device)
    segment_L = (torch.searchsorted(cu_S1, index_L, right=True) - 1).clamp(0, len(cu_S1) - 1)
    return torch.where(index_L < cu_S1[-1], index_L - cu_S1[segment_L], torch.zeros_like(index_L))


def _has_images(pixel_values, image_grid_thw) -> bool:
    return pixel_values is not None and image_grid_thw is not None and bool(image_grid_thw.numel())


def _append_text_positions(position_ids_4BL: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` text positions appended to ``[4, B, L]`` positions: the text row continues after
    its last position, the M-RoPE rows after the row's highest position."""
    step_11n = torch.arange(1, n + 1, dtype=position_ids_4BL.dtype, device=position_ids_4BL.device).view(1, 1, n)
    text_1Bn = position_ids_4BL[:1, :, -1:] + step_11n
    top_1B1 = position_ids_4BL[1:].amax(dim=(0, 2)).view(1, -1, 1)
    mrope_3Bn = (top_1B1 + step_11n).expand(3, -1, -1)
    return torch.cat([position_ids_4BL, torch.cat([text_1Bn, mrope_3Bn])], dim=-1)
