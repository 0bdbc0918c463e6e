"""CompConfig: the CoMP-MM's settings, importable without the modeling code (``AutoConfig``
reads it, see comp.auto)."""

from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, Qwen2VLTextConfig
from transformers.configuration_utils import SubConfigSpec

from comp.models.vision.configuration import CompVisionConfig


PriorMode = Literal["reference", "sinkhorn"]  # comp.models.alignment.sinkhorn_log_targets' modes
PRIOR_MODES: tuple[str, ...] = get_args(PriorMode)
# Word-embedding rows of a CoMP-MM (CompForConditionalGeneration.resize_vocab): the tokenizer's
# length, as the reference, or the LLM's padded table.
VocabRows = Literal["tokenizer", "llm"]
VOCAB_ROWS: tuple[str, ...] = get_args(VocabRows)
DEFAULT_VOCAB_ROWS: VocabRows = "tokenizer"


def mrope_section_for(head_dim: int) -> list[int]:
    """Qwen2-VL's [16, 24, 24] (head_dim 128) scaled to another head dim (sum = head_dim/2)."""
    scale = head_dim / 128
    section = [int(16 * scale), int(24 * scale), int(24 * scale)]
    section[0] += head_dim // 2 - sum(section)
    return section


# Fields of a Qwen2 config that carry over to the M-RoPE text config.
_QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_sliding_window", "sliding_window", "max_window_layers",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
)


@strict
class CompConfig(PreTrainedConfig):
    """CoMP-MM: encoder + merger settings (``vision_config``), the M-RoPE LLM
    (``text_config``), special-token ids and the alignment-loss settings of the reference."""

    model_type = "comp"
    # A CompConfig built without a text config (a directory that is no CoMP-MM, a bare
    # CompConfig()) gets a tiny LLM, never Qwen2-VL's default 8192-wide, 80-layer one that
    # would eat the host's memory; real models always carry their text_config.
    sub_configs_defaults = {"vision_config": CompVisionConfig,
                            "text_config": SubConfigSpec(Qwen2VLTextConfig, init_kwargs=dict(
                                vocab_size=1024, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": mrope_section_for(16)}))}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    spatial_merge_size: int = 2
    use_alignment_loss: bool = False
    loss_weight: float = 0.05
    embed_temp: float = 0.005
    word_temp: float = 0.05
    word_eps: float = 0.005
    sinkhorn_iters: int = 3
    prior_mode: str = "reference"  # one of PRIOR_MODES
    lm_loss_chunk_size: int = 4096
    num_prototypes: int | None = None  # vocabulary rows used as alignment prototypes (None: all)
    word_prior_source: str | None = None  # the prior's file (or "uniform") this model trained with
    word_prior_sha256: str | None = None  # its checksum, so a continued stage can check it
    tie_word_embeddings: bool = True


def text_config_from_qwen2(qwen2_config) -> Qwen2VLTextConfig:
    """The M-RoPE text config for a Qwen2/Qwen2.5 LLM (mrope_section scaled to its head dim)."""
    fields = {k: getattr(qwen2_config, k) for k in _QWEN2_FIELDS if hasattr(qwen2_config, k)}
    head_dim = qwen2_config.hidden_size // qwen2_config.num_attention_heads
    rope = dict(getattr(qwen2_config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(qwen2_config, "rope_theta", 1_000_000.0))
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta,
                                 "mrope_section": mrope_section_for(head_dim)}
    return Qwen2VLTextConfig(**fields)
