"""Optimiser groups, logged learning rates, LM-loss normalisation and the word prior, as the
reference does them or as documented departures with a flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from comp import CompForConditionalGeneration
from comp.data.sampler import ModalityLengthGroupedSampler
from comp.data.toyworld import write_toyworld
from comp.train.args import ModelArguments
from comp.train.run import check_resume_prior, configure
from comp.train.trainer import group_learning_rates, micro_batch_normalizer, param_groups, set_tunable_parts

REPO = Path(__file__).resolve().parents[1]
ALL = "mm_vision_tower,mm_mlp_adapter,mm_language_model,mm_lm_head"
@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.manual_seed(0)
    return CompForConditionalGeneration.from_components(tiny_dir("qwen2"), tiny_dir("siglip"), use_rope=True)


def _parts(groups):
    return {g["part"]: g["lr"] for g in groups}


def test_stage3_groups_with_and_without_the_reference_flag(model):
    set_tunable_parts(model, ALL.split(","))
    kwargs = dict(lr=1e-5, vision_lr=2e-5, projector_lr=None, weight_decay=0.0)
    ours = param_groups(model, **kwargs)
    assert _parts(ours) == {"mm_vision_tower": 2e-5, "mm_mlp_adapter": 1e-5, "mm_language_model": 1e-5}
    reference = param_groups(model, **kwargs, reference=True)
    assert _parts(reference) == {"mm_vision_tower": 2e-5, "mm_language_model": 1e-5}
    in_groups = {id(p) for g in reference for p in g["params"]}
    merger = [p for n, p in model.named_parameters() if n.startswith("visual.merger.")]
    assert merger and all(p.requires_grad and id(p) not in in_groups for p in merger)
    # with a projector lr (Stage II) the flag changes nothing
    stage2 = dict(lr=2e-5, vision_lr=1e-4, projector_lr=5e-3, weight_decay=0.0)
    assert _parts(param_groups(model, **stage2, reference=True)) == _parts(param_groups(model, **stage2))


def test_logged_learning_rates_are_the_optimizers(model):
    set_tunable_parts(model, ALL.split(","))
    groups = param_groups(model, lr=2e-5, vision_lr=1e-4, projector_lr=5e-3, weight_decay=0.0)
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    opt.step()
    sched.step()
    got = group_learning_rates(opt.param_groups, 2e-5, logged=opt.param_groups[0]["lr"])
    assert got == pytest.approx({"learning_rate": 1e-5, "lr/mm_language_model": 1e-5,
                                 "lr/mm_vision_tower": 5e-5, "lr/mm_mlp_adapter": 2.5e-3})


def test_micro_batch_normalizer_gives_the_mean_of_micro_batch_means():
    labels = [torch.tensor([[-100, 1, 2, 3, -100]]), torch.tensor([[-100, 5, -100, -100, -100]])]
    sums = [torch.tensor(6.0), torch.tensor(1.0)]  # summed token losses of two micro-batches
    got = sum(s / micro_batch_normalizer(l, 2, 1) for s, l in zip(sums, labels))
    assert got.item() == pytest.approx((6.0 / 3 + 1.0 / 1) / 2)


def test_sampler_balances_every_micro_batch_across_ranks():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 3000, 16 * 8 * 2 * 20)
    order = np.array(list(ModalityLengthGroupedSampler(lengths, 16, world_size=8, grad_accum_steps=2)))
    tokens_K = lengths[order].reshape(-1, 16).sum(1).reshape(-1, 2, 8)  # step, micro-step, rank
    per_rank = tokens_K.sum(1)
    assert (per_rank.max(1) / per_rank.mean(1)).mean() < 1.05
    assert (tokens_K.max(2) / tokens_K.mean(2)).mean() < 1.05


def test_alignment_without_a_prior_is_an_error_with_a_hint(model, tmp_path):
    args = dict(model_name_or_path="unused", use_alignment_loss=1, use_rope=1, mm_tunable_parts="mm_mlp_adapter")
    model.config.word_prior_source = model.config.word_prior_sha256 = None
    with pytest.raises(ValueError, match="comp data prior.*--word_dist_path uniform"):
        configure(model, ModelArguments(**args))
    configure(model, ModelArguments(**args, word_dist_path="uniform"))
    assert model.config.word_prior_source == "uniform"
    counts = tmp_path / "counts.pt"
    torch.save([3] * model.num_prototypes, counts)
    configure(model, ModelArguments(**args, word_dist_path=str(counts)))
    assert model.config.word_prior_source == str(counts.resolve()) and len(model.config.word_prior_sha256) == 64
    # a continued stage without --word_dist_path reuses the recorded prior; a changed file is refused
    configure(model, ModelArguments(**args))
    torch.save([4] * model.num_prototypes, counts)
    with pytest.raises(ValueError, match="changed since the checkpoint trained"):
        configure(model, ModelArguments(**args))
    # a resume checks the checkpoint's prior
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(
        {"word_prior_source": "uniform", "word_prior_sha256": None}))
    with pytest.raises(ValueError, match="resume with the same --word_dist_path"):
        check_resume_prior(tmp_path / "ckpt", model.config)
    model.set_word_prior("uniform")
    check_resume_prior(tmp_path / "ckpt", model.config)


@pytest.fixture(scope="module")
def real_vocab_llm(qwen2_tokenizer_dir, tmp_path_factory):
    """A tiny Qwen2 LLM with the real Qwen2 vocabulary (151,936 entries in the shared
    tokenizer, the 5 vision tokens appended when the model is built: 151,941 prototypes)."""
    out = tmp_path_factory.mktemp("real_vocab")
    tok = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reference_word_dist_file_works_as_the_recipes_pass_it(real_vocab_llm, tiny_dir, word_dist_fixture,
                                                              tmp_path):
    """Stage II-like flags (the recipes pass only --word_dist_path): one step trains, the prior
    is padded unasked, recorded with its checksum, and the logged lrs are each group's."""
    data = write_toyworld(tmp_path / "tw", seed=0, size="small")
    out = tmp_path / "out"
    args = ["comp.train", "--model_name_or_path", str(real_vocab_llm), "--custom_visual_model",
            str(tiny_dir("siglip")), "--data_path", str(data / "stage2.yaml"), "--output_dir", str(out),
            "--mm_tunable_parts", ALL, "--learning_rate", "2e-5", "--mm_vision_tower_lr", "1e-4",
            "--mm_projector_lr", "5e-3", "--lr_scheduler_type", "constant", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_num_vistoken", "16", "--model_max_length", "512", "--use_rope", "1",
            "--use_alignment_loss", "1", "--word_dist_path", str(word_dist_fixture),
            "--group_by_modality_length", "True", "--dataloader_drop_last", "True",
            "--report_to", "none", "--use_cpu", "True", "--dataloader_num_workers", "0",
            "--save_strategy", "no", "--logging_steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the 284 rows beyond the file count 1" in proc.stdout + proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["word_prior_source"] == str(Path(word_dist_fixture).resolve())
    assert len(config["word_prior_sha256"]) == 64
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert logs[0]["learning_rate"] == pytest.approx(2e-5)
    assert logs[0]["lr/mm_language_model"] == pytest.approx(2e-5)
    assert logs[0]["lr/mm_vision_tower"] == pytest.approx(1e-4)
    assert logs[0]["lr/mm_mlp_adapter"] == pytest.approx(5e-3)


def test_recipes_pass_drop_last_and_no_pad_flag():
    from comp import recipes

    for name in recipes.names():
        for stage in recipes.load_recipe(name).stages:
            for mode in recipes.MODES:
                flags = recipes.stage_flags(stage, mode)
                assert flags[flags.index("--dataloader_drop_last") + 1] == "True", (name, stage.name, mode)
                assert not any("word_dist_pad" in f for f in flags)
    assert "word_dist_pad" not in "".join(p.read_text() for p in (REPO / "scripts" / "comp").glob("*.sh"))
