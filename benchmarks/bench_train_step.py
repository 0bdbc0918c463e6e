"""Training-step tokens/s of the smoke setup and its split into phases, timed by explicit calls.

Smoke setup (comp_1b_siglip's stage2a in smoke mode, src/comp/recipes, built through
``comp.train``'s own parse_args / build_model / build_data): tiny SigLIP + tiny Qwen2, toyworld
Stage II, alignment loss on with the data's word prior, all parts trainable, fp32 on CPU,
batch 2 x 2 accumulation, 64 visual tokens max, activation checkpointing, the Trainer's
optimizer class with CoMP's parameter groups, gradient clipping at 1.0 (the scheduler is left out).

Each optimizer step fetches its micro-batches once (data wait), then runs them twice:
1. decomposed: the pieces of ``CompForConditionalGeneration.forward`` called one by one
   (vision = encoder + merger; LLM forward = embeddings, feature insertion, M-RoPE ids, decoder;
   alignment text pass; loss = chunked LM loss + alignment loss), then backward (which
   includes the checkpointed recomputation) and the optimizer step, each phase timed;
2. plain: ``model(**inputs).loss.backward()`` and the optimizer step, as the Trainer runs it.
Before timing, the decomposed losses are checked against ``model(**inputs)`` (lm, alignment,
total), so the split accounts for the real forward. Printed: each phase's share, the ratio of
the phases' sum to the plain step (~1.0), and tokens/s (LLM sequence tokens without padding,
visual tokens included) of the plain step.

``--real-widths`` (for a GPU): one Stage-II-shaped step at SigLIP-So400M + Qwen2.5-0.5B
dimensions, random init, bf16, activation checkpointing, synthetic batch of one ~3000-token
image + text per sample; prints tokens/s, peak memory and model-FLOPs utilisation against
``--peak-tflops`` (777, the measured bf16 matmul peak of the lent H100). Model FLOPs per step:

    6 * N_llm * T_llm            decoder layers + final norm (no embeddings), T_llm = sequence tokens
  + 6 * V * D * T_sup            lm_head on the supervised rows (the chunked loss computes no other logits)
  + 6 * L_llm * d * sum(S_i^2)   causal attention (QK^T and AV, half the square), S_i = sample lengths
  + 2 * N_llm * T_align + 2 * L_llm * d * sum(A_i^2)   the alignment text pass (forward only)
  + 6 * N_enc * P + 6 * N_merger * M   encoder (patch embedding + layers + norm) per patch, merger per merged token
  + 12 * L_enc * d_enc * sum(P_i^2)    bidirectional attention inside each image of P_i patches
The recomputation of activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
``--dry-run`` builds that model on the meta device and prints parameter counts and FLOPs.

    python benchmarks/bench_train_step.py                 # smoke setup on CPU, < 1 min
    python benchmarks/bench_train_step.py --quick
    python benchmarks/bench_train_step.py --real-widths --dry-run
    python benchmarks/bench_train_step.py --real-widths   # GPU: bf16, 16 samples x 3000 visual tokens
    python benchmarks/bench_train_step.py --real-widths --device cpu --layers 1 --batch-size 2 --visual-tokens 16

Shape legend: B rows, L row length, D LLM width, M merged visual tokens, N images, S samples,
K prototypes, T patches.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import Qwen2Config, Trainer

from comp.data.collator import Batch
from comp.data.toyworld import write_toyworld
from comp.models.alignment import alignment_loss, masked_mean_pool, pool_image_features
from comp.models.configuration import CompConfig, text_config_from_qwen2
from comp.models.mllm import CompForConditionalGeneration
from comp.models.tiny import write_tiny
from comp.models.vision.configuration import CompVisionConfig
from comp.train.args import parse_args
from comp.train.run import build_data, build_model
from comp.train.trainer import StepCounts, param_groups

PHASES = ("data wait", "vision", "LLM forward", "alignment text pass", "loss: LM",
          "loss: alignment", "backward", "optimizer step")
MAX_GRAD_NORM = 1.0  # TrainingArguments' default, applied by the Trainer before each step

# Qwen2.5 special ids (real vocabulary) for the synthetic real-width batch.
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = 151644, 151645, 151652, 151653, 151655
QWEN_TEXT_IDS = 151643  # ordinary BPE ids are below this
QWEN_TOKENIZER_LEN = 151665  # len(tokenizer): alignment prototypes (the table has 151936 rows)


class PhaseClock:
    """Seconds per phase; ``sync`` waits for the device so a phase's kernels count in it."""

    def __init__(self, sync=lambda: None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync

    @contextmanager
    def __call__(self, phase: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[phase] += time.perf_counter() - start


# ------------------------------------------------------------------------------ the step


def step_counts(batches: list[Batch]) -> StepCounts:
    """The Trainer's step-global denominators (CompTrainer.get_batch_samples, one rank)."""
    tokens = sum(int((b.inputs["labels"][..., 1:] != -100).sum()) for b in batches)
    align = sum(int((b.has_image_S & (b.inputs["align_attention_mask"].sum(1) > 0)).sum()) for b in batches)
    device = batches[0].inputs["labels"].device
    return StepCounts(supervised_tokens=torch.tensor(float(max(tokens, 1)), dtype=torch.float64, device=device),
                      align_samples=torch.tensor(float(max(align, 1)), dtype=torch.float64, device=device))


def model_inputs(batch: Batch, counts: StepCounts) -> dict:
    """What CompTrainer.compute_loss passes to the model."""
    return {**batch.inputs, "lm_loss_normalizer": counts.supervised_tokens, "align_normalizer": counts.align_samples}


def decomposed_loss(model: CompForConditionalGeneration, batch: Batch, counts: StepCounts,
                    clock: PhaseClock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lm_loss, align_loss) of ``model.forward`` with labels, piece by piece."""
    cfg = model.config
    ids_BL, mask_BL, grid_N3 = batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.inputs["image_grid_thw"]
    if grid_N3 is None:
        raise SystemExit("a Stage II batch without images; the decomposition covers image batches only")
    with clock("vision"):
        feats_MD = model.image_features(batch.inputs["pixel_values"], grid_N3)
    with clock("LLM forward"):
        embeds_BLD = model.insert_image_features(ids_BL, model.model.embed_tokens(ids_BL), feats_MD)
        pos_3BL, _ = model.position_ids(ids_BL, grid_N3, mask_BL)
        hidden_BLD = model.model(inputs_embeds=embeds_BLD, attention_mask=mask_BL, position_ids=pos_3BL,
                                 use_cache=False).last_hidden_state
    with clock("loss: LM"):
        lm_sum, _ = model.lm_head(hidden_BLD, batch.inputs["labels"], chunk_size=cfg.lm_loss_chunk_size,
                                  reduction="sum")
        lm_loss = lm_sum / counts.supervised_tokens
    align_ids_SL, align_mask_SL = batch.inputs["align_input_ids"], batch.inputs["align_attention_mask"]
    with clock("alignment text pass"), torch.no_grad():
        text_SLD = model.model(input_ids=align_ids_SL, attention_mask=align_mask_SL).last_hidden_state
        f_t_SD = masked_mean_pool(text_SLD.float(), align_mask_SL)
    with clock("loss: alignment"):
        tokens_per_image_N = grid_N3.prod(-1) // cfg.spatial_merge_size ** 2
        sample_index_M = torch.repeat_interleave(batch.inputs["image_sample_index"].to(grid_N3.device), tokens_per_image_N)
        f_v_SD, has_image_S = pool_image_features(feats_MD, sample_index_M, align_ids_SL.shape[0])
        keep_S = has_image_S & (align_mask_SL.sum(1) > 0).to(has_image_S.device)
        mean = alignment_loss(f_v_SD.float(), f_t_SD, model.lm_head.weight[:model.num_prototypes],
                              model.log_word_prior_K.to(f_t_SD.device), keep_S, embed_temp=cfg.embed_temp,
                              word_eps=cfg.word_eps, iters=cfg.sinkhorn_iters, mode=cfg.prior_mode)
        align = mean * keep_S.sum() / counts.align_samples
        loss = lm_loss + cfg.loss_weight * align
    return loss, lm_loss, align


def check_decomposition(model, batches: list[Batch], counts: StepCounts, rtol: float) -> float:
    """Largest relative difference of (loss, lm_loss, align_loss) between the pieces and ``model(**inputs)``."""
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            mine = decomposed_loss(model, batch, counts, PhaseClock())
            out = model(**model_inputs(batch, counts))
            for name, a, b in zip(("loss", "lm_loss", "align_loss"), mine, (out.loss, out.lm_loss, out.align_loss)):
                diff = abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)
                if diff > rtol:
                    raise SystemExit(f"decomposed {name} {float(a):.8g} != model(**batch).{name} {float(b):.8g}")
                worst = max(worst, diff)
    return worst


def optimizer_step(model, optimizer) -> None:
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def decomposed_step(model, optimizer, batches, counts, clock: PhaseClock) -> None:
    for batch in batches:
        loss, _, _ = decomposed_loss(model, batch, counts, clock)
        with clock("backward"):
            loss.backward()
    with clock("optimizer step"):
        optimizer_step(model, optimizer)


def plain_step(model, optimizer, batches, counts) -> None:
    for batch in batches:
        model(**model_inputs(batch, counts)).loss.backward()
    optimizer_step(model, optimizer)


def make_optimizer(model, training_args):
    """The Trainer's optimizer class and kwargs over CoMP's parameter groups (CompTrainer.create_optimizer)."""
    groups = param_groups(model, lr=training_args.learning_rate, vision_lr=training_args.mm_vision_tower_lr,
                          projector_lr=training_args.mm_projector_lr, weight_decay=training_args.weight_decay)
    for g in groups:
        g.pop("names")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    kwargs.pop("lr", None)
    return cls(groups, **kwargs)


def print_split(steps: list[dict]) -> float:
    """Per-phase medians over steps (the CPUs here are shared: a median shrugs off the steps
    another process disturbed) and the ratios; returns the median plain step in seconds."""
    def median(key: str) -> float:
        return statistics.median(step.get(key, 0.0) for step in steps)

    phase_s = {phase: median(phase) for phase in PHASES}
    total = sum(phase_s.values())
    print(f"\n{'phase':22s} {'ms/step':>9s} {'share':>7s}   (median of {len(steps)} steps)")
    for phase, s in phase_s.items():
        print(f"{phase:22s} {1e3 * s:9.1f} {s / total:7.1%}")
    print(f"{'phases sum':22s} {1e3 * total:9.1f}")
    print(f"{'full step (plain)':22s} {1e3 * median('plain'):9.1f}")
    ratio = statistics.median(sum(step[p] for p in PHASES) / step["plain"] for step in steps)
    overhead = statistics.median(sum(step[p] for p in PHASES) / step["decomposed"] for step in steps)
    print(f"phases sum / plain full step: {ratio:.3f}   (phases sum / decomposed step wall: {overhead:.3f})")
    tokens_s = statistics.median(step["tokens"] / step["plain"] for step in steps)
    patches_s = statistics.median(step["patches"] / step["plain"] for step in steps)
    print(f"tokens/s (plain step): {tokens_s:,.0f} LLM tokens/s, {patches_s:,.0f} encoder patches/s "
          f"({median('tokens'):,.0f} LLM tokens and {median('patches'):,.0f} patches per step)")
    return median("plain")


def timed_steps(model, optimizer, next_batches, steps: int, sync=lambda: None) -> list[dict]:
    """Run ``steps`` optimizer steps, each twice on the same micro-batches (decomposed and plain,
    alternating which goes first). Per step: seconds per phase, ``decomposed`` and ``plain``
    (full steps, the data wait counted in both), ``tokens`` (LLM, no padding) and ``patches``."""
    records = []
    for k in range(steps):
        clock = PhaseClock(sync)
        with clock("data wait"):
            batches = next_batches()
        counts = step_counts(batches)
        record = {}
        for variant in ("decomposed", "plain")[::1 if k % 2 == 0 else -1]:
            sync()
            start = time.perf_counter()
            if variant == "decomposed":
                decomposed_step(model, optimizer, batches, counts, clock)
            else:
                plain_step(model, optimizer, batches, counts)
            sync()
            record[variant] = time.perf_counter() - start + clock.seconds["data wait"]
        record.update(clock.seconds, tokens=sum(int(b.inputs["attention_mask"].sum()) for b in batches),
                      patches=sum(int(b.inputs["pixel_values"].shape[0]) for b in batches))
        records.append(record)
    return records


# ------------------------------------------------------------------------------ smoke setup


def smoke_argv(assets: Path, prior: Path, out: Path) -> list[str]:
    """``comp.train`` flags of comp_1b_siglip's stage2a in smoke mode (the recipe file through
    comp.recipes, as COMP_SMOKE=1 runs it), built from the LLM + encoder as Stage I does."""
    from comp import recipes

    stage = next(s for s in recipes.load_recipe("comp_1b_siglip").stages if s.name == "stage2a")
    return ["--model_name_or_path", str(assets / "qwen2"), "--custom_visual_model", str(assets / "siglip"),
            "--data_path", str(assets / "toyworld" / stage.data), "--output_dir", str(out),
            "--word_dist_path", str(prior), *recipes.stage_flags(stage, "smoke")]


def prepare_assets(root: Path) -> tuple[Path, Path]:
    """Tiny checkpoints, toyworld (small) and its Stage II word prior under ``root`` (reused)."""
    from comp.data.prior import word_prior

    for kind in ("qwen2", "siglip"):
        if not (root / kind / "config.json").exists():
            write_tiny(root / kind, kind)
    if not (root / "toyworld" / "stage2.yaml").exists():
        write_toyworld(root / "toyworld", seed=0, size="small")
    prior = root / "word_dist.pt"
    if not prior.exists():
        counts, _ = word_prior(str(root / "toyworld" / "stage2.yaml"), str(root / "qwen2"))
        torch.save(counts, prior)
    return root, prior


def run_smoke(args) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        assets, prior = prepare_assets(args.assets or Path(tmp))
        model_args, data_args, training_args = parse_args(smoke_argv(assets, prior, Path(tmp) / "out"))
        torch.manual_seed(training_args.seed)
        model, processor = build_model(model_args, data_args)
        if training_args.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        dataset, collator, sampler = build_data(data_args, processor, training_args)
        loader = DataLoader(dataset, batch_size=training_args.per_device_train_batch_size, sampler=sampler,
                            collate_fn=collator, num_workers=training_args.dataloader_num_workers)
        optimizer = make_optimizer(model, training_args)
        stream = iter(())

        def next_batches() -> list[Batch]:
            nonlocal stream
            batches = []
            while len(batches) < training_args.gradient_accumulation_steps:
                try:
                    batches.append(next(stream))
                except StopIteration:
                    stream = iter(loader)
            return batches

        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"smoke stage2a: tiny SigLIP + tiny Qwen2, {params:,} parameters ({trainable:,} trainable), "
              f"fp32, {torch.get_num_threads()} threads, batch {training_args.per_device_train_batch_size} x "
              f"{training_args.gradient_accumulation_steps} accumulation, {type(optimizer).__name__}, "
              f"activation checkpointing {training_args.activation_checkpointing}")
        first = next_batches()
        worst = check_decomposition(model, first, step_counts(first), rtol=1e-6)
        print(f"decomposed losses == model(**batch) losses (max relative difference {worst:.1e})")
        timed_steps(model, optimizer, next_batches, 1 if args.quick else args.warmup)
        steps = 3 if args.quick else args.steps
        print_split(timed_steps(model, optimizer, next_batches, steps))


# ------------------------------------------------------------------------------ real widths


def real_width_config(layers: int | None) -> CompConfig:
    """SigLIP-So400M/14 (C-RoPE, 2x2 merger to 896) + Qwen2.5-0.5B, with the real vocabulary."""
    vision = CompVisionConfig(family="siglip", hidden_size=1152, intermediate_size=4304,
                              num_hidden_layers=layers or 27, num_attention_heads=16, patch_size=14,
                              image_size=384, use_rope=True, w_merger=896)
    qwen25 = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=layers or 24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    return CompConfig(vision_config=vision, text_config=text_config_from_qwen2(qwen25),
                      tie_word_embeddings=True, use_alignment_loss=True, num_prototypes=QWEN_TOKENIZER_LEN)


def merge_grid(visual_tokens: int) -> tuple[int, int]:
    """(h, w) merge windows with h * w = visual_tokens, as square as the factors allow."""
    h = math.isqrt(visual_tokens)
    while visual_tokens % h:
        h -= 1
    return h, visual_tokens // h


def synthetic_batch(batch_size: int, visual_tokens: int, prompt: int, answer: int, patch_dim: int,
                    device, dtype, gen: torch.Generator) -> Batch:
    """Stage-II-shaped samples: user turn (one image + a prompt), one assistant answer."""
    h, w = merge_grid(visual_tokens)
    rows, labels = [], []
    for _ in range(batch_size):
        text = torch.randint(0, QWEN_TEXT_IDS, (prompt + answer + 4,), generator=gen).tolist()
        user = [IM_START, *text[:2], VISION_START, *[IMAGE_PAD] * visual_tokens, VISION_END,
                *text[4:4 + prompt], IM_END, text[2]]
        reply = [*text[4 + prompt:], IM_END]
        rows.append([*user, IM_START, text[3], *reply, text[2]])
        labels.append([-100] * (len(user) + 2) + reply + [-100])
    grid_N3 = torch.tensor([[1, 2 * h, 2 * w]] * batch_size)
    answers_SL = torch.tensor([r[len(r) - answer - 2:len(r) - 2] for r in rows])
    return Batch(has_image_S=torch.ones(batch_size, dtype=torch.bool, device=device), inputs={
        "input_ids": torch.tensor(rows, device=device),
        "labels": torch.tensor(labels, device=device),
        "attention_mask": torch.ones(batch_size, len(rows[0]), dtype=torch.long, device=device),
        "pixel_values": torch.randn(batch_size * 4 * h * w, patch_dim, generator=gen).to(device, dtype),
        "image_grid_thw": grid_N3.to(device),
        "image_sample_index": torch.arange(batch_size, device=device),
        "align_input_ids": answers_SL.to(device),
        "align_attention_mask": torch.ones_like(answers_SL, device=device),
        "record_ids": [f"synthetic-{i}" for i in range(batch_size)],
    })


def parameter_counts(model: CompForConditionalGeneration) -> dict[str, int]:
    def n(params) -> int:
        return sum(p.numel() for p in params)

    visual = model.visual
    merger = n(visual.merger.parameters())
    pos_table = n(p for name, p in visual.named_parameters() if "position_embedding" in name)
    embed = model.model.embed_tokens.weight.numel()
    return {"encoder": n(visual.parameters()) - merger, "encoder position table": pos_table,
            "merger": merger, "LLM": n(model.model.parameters()), "LLM embeddings (tied lm_head)": embed,
            "LLM non-embedding": n(model.model.parameters()) - embed}


def step_flops(cfg: CompConfig, counts: dict[str, int], batch: Batch) -> dict[str, float]:
    """Model FLOPs of one training step on ``batch`` (formula in the module docstring)."""
    tc, vc = cfg.text_config, cfg.vision_config
    d_llm = tc.num_attention_heads * (tc.hidden_size // tc.num_attention_heads)
    lengths_S = batch.inputs["attention_mask"].sum(1).double()
    align_S = batch.inputs["align_attention_mask"].sum(1).double()
    patches_N = batch.inputs["image_grid_thw"].prod(-1).double()
    tokens, supervised = float(lengths_S.sum()), float((batch.inputs["labels"][:, 1:] != -100).sum())
    enc_params = counts["encoder"] - counts["encoder position table"]
    return {
        "LLM": 6 * counts["LLM non-embedding"] * tokens
        + 6 * tc.num_hidden_layers * d_llm * float((lengths_S ** 2).sum()),
        "lm_head": 6 * tc.vocab_size * tc.hidden_size * supervised,
        "alignment text pass": 2 * counts["LLM non-embedding"] * float(align_S.sum())
        + 2 * tc.num_hidden_layers * d_llm * float((align_S ** 2).sum()),
        "encoder": 6 * enc_params * float(patches_N.sum())
        + 12 * vc.num_hidden_layers * vc.hidden_size * float((patches_N ** 2).sum()),
        "merger": 6 * counts["merger"] * float(patches_N.sum()) / cfg.spatial_merge_size ** 2,
    }


def run_real_widths(args) -> None:
    device = torch.device("meta" if args.dry_run else args.device)
    dtype = getattr(torch, args.dtype)
    cfg = real_width_config(args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = CompForConditionalGeneration(cfg).to(dtype)
    counts = parameter_counts(model)
    print(f"real widths ({'meta device' if args.dry_run else f'{device}, {args.dtype}'}; "
          f"{cfg.vision_config.num_hidden_layers} encoder / {cfg.text_config.num_hidden_layers} LLM layers):")
    for name, value in counts.items():
        print(f"  {name:32s} {value / 1e6:9.1f} M")
    gen = torch.Generator().manual_seed(0)
    vc = cfg.vision_config
    batch = synthetic_batch(args.batch_size, args.visual_tokens, args.prompt_tokens, args.answer_tokens,
                            vc.num_channels * vc.patch_size ** 2, "cpu", dtype, gen)
    flops = step_flops(cfg, counts, batch)
    print(f"batch: {args.batch_size} samples x {batch.inputs['input_ids'].shape[1]} tokens "
          f"({args.visual_tokens} visual = {merge_grid(args.visual_tokens)} merge windows), "
          f"{batch.inputs['pixel_values'].shape[0]:,} patches")
    print("model FLOPs per step: " + ", ".join(f"{k} {v / 1e12:,.1f} T" for k, v in flops.items())
          + f"; total {sum(flops.values()) / 1e12:,.1f} TFLOP")
    if args.dry_run:
        return

    batch = batch.to(device)
    model.set_word_prior("uniform")  # uniform prior (random init, no data)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    groups = param_groups(model, lr=2e-5, vision_lr=1e-4, projector_lr=5e-3, weight_decay=0.0)
    for g in groups:
        g.pop("names")
    optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    counts_step = step_counts([batch])
    worst = check_decomposition(model, [batch], counts_step, rtol=args.rtol)
    print(f"decomposed losses == model(**batch) losses (max relative difference {worst:.1e})")
    timed_steps(model, optimizer, lambda: [batch], args.warmup, sync)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = print_split(timed_steps(model, optimizer, lambda: [batch], args.steps, sync))
    achieved = sum(flops.values()) / step_s
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a (CPU)"
    print(f"step {step_s:.3f} s, {achieved / 1e12:.1f} TFLOP/s model FLOPs, MFU {achieved / (args.peak_tflops * 1e12):.1%} "
          f"of {args.peak_tflops:g} TFLOP/s, peak memory {peak}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (smoke 8, real widths 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="smoke: torch threads (1: steadiest on shared CPUs)")
    parser.add_argument("--assets", type=Path, help="smoke: folder holding (or to receive) tiny checkpoints "
                        "and toyworld; default: a temporary folder")
    real = parser.add_argument_group("real widths (SigLIP-So400M + Qwen2.5-0.5B)")
    real.add_argument("--real-widths", action="store_true")
    real.add_argument("--dry-run", action="store_true", help="real widths on the meta device: sizes and FLOPs only")
    real.add_argument("--device", default="cuda")
    real.add_argument("--dtype", default="bfloat16")
    real.add_argument("--layers", type=int, help="override both layer counts (a CPU check of the code path)")
    real.add_argument("--batch-size", type=int, default=16, help="reference Stage II per-device batch")
    real.add_argument("--visual-tokens", type=int, default=3000, help="merged visual tokens per image")
    real.add_argument("--prompt-tokens", type=int, default=64)
    real.add_argument("--answer-tokens", type=int, default=400, help="dense caption / OCR answer length")
    real.add_argument("--peak-tflops", type=float, default=777.0)
    real.add_argument("--rtol", type=float, default=2e-2, help="decomposition check tolerance (bf16)")
    args = parser.parse_args()
    if args.real_widths or args.dry_run:
        args.steps = args.steps or 3
        run_real_widths(args)
    else:
        args.steps = args.steps or 8
        run_smoke(args)


if __name__ == "__main__":
    main()
