"""Command-line arguments of ``comp train``: the flag names of the reference scripts.

Model and data flags are CoMP's own dataclasses; everything else is transformers'
``TrainingArguments`` (learning_rate, per_device_train_batch_size, deepspeed, bf16, ...), so
the seed scripts' command lines run unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

LM_LOSS_NORMALIZATIONS = ("step", "micro_batch")
TUNABLE_PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model", "mm_lm_head")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a Qwen2/Qwen2.5 LLM directory (a new CoMP-MM is "
                                              "built around it) or a CoMP-MM directory (the previous step)"})
    custom_visual_model: str | None = field(default=None, metadata={
        "help": "encoder directory (original SigLIP/DINOv2/AIMv2 or a CoMP-VFM); only used when "
                "model_name_or_path is an LLM"})
    mm_tunable_parts: str = field(default="mm_mlp_adapter", metadata={
        "help": f"comma-separated subset of {','.join(TUNABLE_PARTS)}"})
    use_rope: int = field(default=1, metadata={"help": "C-RoPE: 2D RoPE in every encoder layer (0/1)"})
    pos_interp_mode: str = field(default="bicubic", metadata={"help": "resizing of the absolute table"})
    use_alignment_loss: int = field(default=0, metadata={"help": "add the alignment loss (0/1)"})
    loss_weight: float = field(default=0.05, metadata={"help": "weight of the alignment loss"})
    embed_temp: float = 0.005
    word_temp: float = 0.05
    word_eps: float = 0.005
    sinkhorn_iters: int = 3
    prior_mode: str = field(default="reference", metadata={"help": "reference | sinkhorn"})
    word_dist_path: str | None = field(default=None, metadata={
        "help": "word-frequency counts over the vocabulary (`comp data prior`), needed with the "
                "alignment loss; 'uniform' asks for a uniform prior (the ablation). When absent, a "
                "continued CoMP-MM reuses the prior its config records"})
    word_dist_pad: bool | None = field(default=None, metadata={
        "help": "a counts file shorter than the prototype rows: missing rows count 1. Default: "
                "padded when at most 1%% of the rows are missing (the reference's 151,657-entry "
                "file on Qwen2.5's 151,665 tokens), refused otherwise"})
    pos_order: str | None = field(default=None, metadata={
        "help": "merge | raster: order in which the encoder adds its position table; default: the "
                "checkpoint's (raster for an encoder detected as trained by the reference code)"})
    lm_loss_chunk_size: int = 4096


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "a mixture YAML (datasets: [{json_path, sampling_strategy}]) "
                                     "or one LLaVA JSON/JSONL file"})
    image_folder: str | None = field(default=None, metadata={"help": "root of relative image paths"})
    data_root: str | None = field(default=None, metadata={
        "help": "root of relative json_path entries (default: the YAML's directory)"})
    max_num_vistoken: int = field(default=1024, metadata={"help": "max visual tokens per image after the 2x2 merge"})
    min_num_vistoken: int = 4
    force_resize: int | None = field(default=None, metadata={"help": "resize to N x N before smart_resize"})
    model_max_length: int = 4096
    max_skip_fraction: float = field(default=0.01, metadata={"help": "stop when more samples are skipped"})
    pack_length: int | None = field(default=None, metadata={"help": "pack samples into rows of N tokens"})
    length_cache_dir: str | None = field(default=None, metadata={
        "help": "where the length-grouped sampler's sample lengths are cached (default "
                "$COMP_CACHE/lengths or ~/.cache/comp/lengths; 'none': never cache)"})
    length_workers: int | None = field(default=None, metadata={
        "help": "processes that compute the sample lengths on rank 0 (default: the CPUs)"})
    prompt_format: str = field(default="reference", metadata={
        "help": "reference: Qwen2-VL's chat format as the reference trained (default system turn, "
                "each turn's images first); inplace: images where their <image> stands, no system turn"})


@dataclass
class CompTrainingArguments(TrainingArguments):
    mm_vision_tower_lr: float | None = field(default=None, metadata={"help": "lr of the encoder (not the merger)"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "lr of the merger"})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "batch multimodal and text-only samples separately, grouped by length (LLaVA)"})
    reference_optimizer_groups: bool = field(default=False, metadata={
        "help": "the reference's parameter groups: with --mm_vision_tower_lr and no "
                "--mm_projector_lr the merger is in no group and is never updated (its Stage III)"})
    lm_loss_normalization: str = field(default="step", metadata={
        "help": "step: token mean over the whole optimizer step (independent of the split); "
                "micro_batch: mean of per-micro-batch token means, as the reference"})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "warmup as a fraction of all steps (the reference's flag; transformers 5 spells "
                "it --warmup_steps with a value below 1)"})
    remove_unused_columns: bool = False

    def __post_init__(self):
        if self.lm_loss_normalization not in LM_LOSS_NORMALIZATIONS:
            raise ValueError(f"--lm_loss_normalization must be one of {LM_LOSS_NORMALIZATIONS}, "
                             f"got {self.lm_loss_normalization!r}")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CompTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, CompTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    parts = [p.strip() for p in model_args.mm_tunable_parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(TUNABLE_PARTS))
    if unknown:
        parser.error(f"--mm_tunable_parts: unknown part(s) {unknown}; choose from {list(TUNABLE_PARTS)}")
    if data_args.prompt_format not in ("reference", "inplace"):
        parser.error(f"--prompt_format must be reference or inplace, got {data_args.prompt_format!r}")
    if model_args.pos_order not in (None, "merge", "raster"):
        parser.error(f"--pos_order must be merge or raster, got {model_args.pos_order!r}")
    return model_args, data_args, training_args
