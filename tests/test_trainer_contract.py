"""CoMP's contract with transformers' Trainer and GenerationMixin: every method our subclasses
override is in its contract table (a private, underscore one only with the reason no public
route exists), every table entry still exists upstream with the parameters it was checked
with, the callbacks listen to events the Trainer still sends, and the typed Batch travels
through the Trainer and accelerate untouched. When transformers changes one of these, this
file fails by name; nothing here reads transformers' source text."""
from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import send_to_device
from transformers import GenerationMixin, Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from comp.data.collator import Batch, DataCollator
from comp.models.mllm import GENERATION_HOOKS, CompForConditionalGeneration
from comp.train.ownership import CHECKPOINT_PREFIX
from comp.train.trainer import (TRAINER_ATTRIBUTES, TRAINER_HOOKS, CompEvents, CompTrainer, EmptyStepGuard,
                                NonFiniteError, callback_events, check_trainer_hooks, hook_changes)


def overrides(cls: type, base: type) -> set[str]:
    """Methods that ``cls`` or a class between it and ``base`` defines over one of ``base``'s
    (constructors and other dunders aside)."""
    found = set()
    for klass in cls.__mro__:
        if klass is base or issubclass(base, klass):
            continue
        found |= {name for name, value in vars(klass).items()
                  if not name.startswith("__") and hasattr(base, name)
                  and callable(value if not isinstance(value, (staticmethod, classmethod)) else value.__func__)}
    return found


def unlisted_private(cls: type, base: type, table: dict) -> set[str]:
    return {name for name in overrides(cls, base) if name.startswith("_")} - set(table)


# ------------------------------------------------------------------ the tables hold

def test_installed_transformers_has_the_checked_hooks():
    check_trainer_hooks()
    assert hook_changes(GenerationMixin, GENERATION_HOOKS) == []


def test_every_trainer_override_is_in_the_table():
    assert unlisted_private(CompTrainer, Trainer, TRAINER_HOOKS) == set()
    assert overrides(CompTrainer, Trainer) == set(TRAINER_HOOKS)  # public ones too: their parameters change as well


def test_every_generation_override_is_in_the_table():
    assert unlisted_private(CompForConditionalGeneration, GenerationMixin, GENERATION_HOOKS) == set()
    assert {n for n in overrides(CompForConditionalGeneration, GenerationMixin) if n.startswith("_")} == set(GENERATION_HOOKS)


def test_the_set_attributes_and_callback_events_exist():
    assert all(hasattr(Trainer, name) for name in TRAINER_ATTRIBUTES)
    assert CompTrainer.loss_is_scaled_for_ga is True
    events = callback_events()
    assert events == {"on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_save"}
    assert all(callable(getattr(TrainerCallback, name, None)) for name in events)


def test_transformers_names_checkpoints_as_resume_and_rotation_look_for_them():
    assert f"{PREFIX_CHECKPOINT_DIR}-" == CHECKPOINT_PREFIX


# ------------------------------------------------------------------ the rules fail when they should

def test_an_unlisted_private_override_is_found():
    class Sneaky(CompTrainer):
        def _maybe_log_save_evaluate(self, *args, **kwargs):
            return None

    class SneakyModel(CompForConditionalGeneration):
        def _prepare_special_tokens(self, *args, **kwargs):
            return None

    assert unlisted_private(Sneaky, Trainer, TRAINER_HOOKS) == {"_maybe_log_save_evaluate"}
    assert unlisted_private(SneakyModel, GenerationMixin, GENERATION_HOOKS) == {"_prepare_special_tokens"}


def test_a_changed_or_vanished_hook_stops_the_run_by_name():
    class Changed(Trainer):
        def _get_train_sampler(self, train_dataset=None, extra=None):  # a new parameter
            return None

    with pytest.raises(RuntimeError, match=r"_get_train_sampler.*checked against transformers 5\.24-5\.25"):
        check_trainer_hooks(Changed)
    gone = dict(GENERATION_HOOKS, _gone_upstream=(("self",), "test"))
    assert hook_changes(GenerationMixin, gone) == ["_gone_upstream is gone"]
    changed = {"_expand_inputs_for_generation": (("self", "expand_size"), "test")}
    assert hook_changes(GenerationMixin, changed)[0].startswith("_expand_inputs_for_generation('self', 'expand_size') is now")


# ------------------------------------------------------------------ the public routes work

def test_an_empty_step_leaves_weights_optimizer_and_schedule_as_they_were():
    """The guard's torch hooks hide the parameters from AdamW's step (weight decay on) and the
    schedule's state is loaded back, in the order the Trainer runs them."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW([{"params": [layer.weight], "weight_decay": 0.1},
                                   {"params": [layer.bias], "weight_decay": 0.0}], lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    guard = EmptyStepGuard()
    guard.watch(optimizer)

    def step(empty: bool) -> None:
        guard.begin_step(empty, scheduler, optimizer)
        (layer(torch.ones(1, 4)).sum() * (0.0 if empty else 1.0)).backward()
        optimizer.step()
        guard.on_optimizer_step(None, None, None)
        scheduler.step()
        guard.on_step_end(None, None, None)
        optimizer.zero_grad()

    step(False)
    step(False)
    before = copy.deepcopy((layer.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    step(True)
    after = (layer.state_dict(), optimizer.state_dict(), scheduler.state_dict())
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(after[1]["state"][i][k]))
               for i, s in before[1]["state"].items() for k, v in s.items())
    assert before[2]["last_epoch"] == after[2]["last_epoch"] == 2
    assert [g["lr"] for g in optimizer.param_groups] == before[2]["_last_lr"]
    step(False)
    assert not torch.equal(before[0]["weight"], layer.weight) and scheduler.last_epoch == 3


class _Order(torch.utils.data.Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(reversed(range(self.n)))

    def __len__(self):
        return self.n


@pytest.fixture(scope="module")
def trainer(mm, tmp_path_factory):
    model, processor = mm
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("run")), use_cpu=True, report_to="none",
                             save_total_limit=2, per_device_train_batch_size=1, dataloader_num_workers=0,
                             remove_unused_columns=False)
    samples = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]), "has_image": False,
                "pixel_values": None, "image_grid_thw": None, "record": f"d.json:{i}"} for i in range(3)]
    built = CompTrainer(model=model, args=args, train_dataset=samples, data_collator=DataCollator(pad_token_id=0),
                        processing_class=processor, train_sampler=_Order(3))
    return built, args


def test_transformers_builds_the_loader_on_our_sampler(trainer):
    built, _ = trainer
    records = [r for batch in built.get_train_dataloader() for r in batch.record_ids]
    assert records == ["d.json:2", "d.json:1", "d.json:0"]


def test_the_trainer_rotates_and_transformers_never_does(trainer):
    built, args = trainer
    assert built.save_total_limit == 2 and built.args.save_total_limit is None
    assert args.save_total_limit == 2  # the caller's arguments are left as they were
    assert any(isinstance(cb, CompEvents) for cb in built.callback_handler.callbacks)
    assert any(cb is built.empty_steps for cb in built.callback_handler.callbacks)


def test_a_non_finite_gradient_stops_by_name(trainer):
    built, _ = trainer
    param = next(p for p in built.model.parameters() if p.requires_grad)
    try:
        param.grad = torch.zeros_like(param)
        assert built.stop_if_gradients_not_finite() is None
        param.grad.view(-1)[0] = float("inf")
        with pytest.raises(NonFiniteError, match="step 1: the gradient norm is inf"):
            built.stop_if_gradients_not_finite()
    finally:
        param.grad = None


def test_the_trainer_checks_the_gradients_before_its_optimizer_step(mm, tmp_path):
    """In transformers' own loop: an infinite gradient stops the run by name at
    on_pre_optimizer_step, before the optimizer moved any weight."""
    model, processor = mm
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                             per_device_train_batch_size=2, dataloader_num_workers=0,
                             remove_unused_columns=False, save_strategy="no")
    samples = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]), "has_image": False,
                "pixel_values": None, "image_grid_thw": None, "record": f"d.json:{i}"} for i in range(2)]
    built = CompTrainer(model=model, args=args, train_dataset=samples, data_collator=DataCollator(pad_token_id=0),
                        processing_class=processor)
    param = model.get_input_embeddings().weight
    before = param.detach().clone()
    handle = param.register_hook(lambda grad: grad * float("inf"))
    try:
        with pytest.raises(NonFiniteError, match=r"step 1: the gradient norm is (inf|nan) \(records \['d.json:"):
            built.train()
    finally:
        handle.remove()
    assert torch.equal(param.detach(), before)


# ------------------------------------------------------------------ the Batch

def _batch() -> Batch:
    sample = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]),
              "has_image": False, "pixel_values": None, "image_grid_thw": None, "record": "d.json:0"}
    return DataCollator(pad_token_id=0)([sample, dict(sample, record="d.json:1")])


def test_batch_passes_through_the_trainer_and_accelerate():
    batch = _batch()
    assert Trainer._prepare_input(SimpleNamespace(), batch) is batch  # not rebuilt as a dict
    moved = send_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, Batch) and moved.record_ids == ["d.json:0", "d.json:1"]
    assert torch.equal(moved.inputs["input_ids"], batch.inputs["input_ids"])
    model = SimpleNamespace(main_input_name="input_ids", num_parameters=lambda exclude_embeddings: 10)
    assert Trainer.floating_point_ops(SimpleNamespace(model=model), batch) == 6 * 6 * 10


def test_batch_keeps_bookkeeping_out_of_the_model_inputs():
    batch = _batch()
    assert set(batch.inputs) == {"input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw",
                                 "image_sample_index", "record_ids"}
    assert batch.num_samples == 2 and batch.skipped == [] and batch.has_image_S.tolist() == [False, False]


def test_the_checked_signatures_are_what_inspect_reads():
    """The tables hold real parameter names (a typo would pass only against a typo upstream)."""
    for name, (params, _) in TRAINER_HOOKS.items():
        assert params is None or params == tuple(inspect.signature(getattr(Trainer, name)).parameters)
