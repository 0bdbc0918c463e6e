"""CompTrainer's contract with transformers' Trainer: the hooks it overrides keep their
parameters and call sites, and the typed Batch travels through the Trainer and accelerate
untouched. When transformers changes one of these, this file fails by name."""
from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import send_to_device
from transformers import Trainer

from comp.data.collator import Batch, DataCollator
from comp.train.trainer import TRAINER_HOOKS, CompTrainer, check_trainer_hooks

TRAINER_SOURCE = inspect.getsource(Trainer)


def test_installed_transformers_has_the_checked_hooks():
    check_trainer_hooks()


def test_a_changed_hook_stops_the_run_by_name():
    class Changed(Trainer):
        def _get_num_items_in_batch(self, batch_samples, device, extra):  # a new parameter
            return None

    with pytest.raises(RuntimeError, match=r"_get_num_items_in_batch.*checked against transformers 5\.17-5\.25"):
        check_trainer_hooks(Changed)


def test_every_overridden_hook_is_in_the_table():
    overridden = {name for name, value in vars(CompTrainer).items()
                  if callable(value) and hasattr(Trainer, name)}
    assert overridden == set(TRAINER_HOOKS) | {"__init__"}


@pytest.mark.parametrize("hook", sorted(TRAINER_HOOKS))
def test_transformers_still_calls_the_hook(hook):
    """Called (``self.hook(``) or handed on as a callback (``sampler_fn=self.hook,``)."""
    assert re.search(rf"self\.{hook}[(,]", TRAINER_SOURCE), f"Trainer no longer uses self.{hook}"


def test_the_loss_scaling_switch_is_read_by_training_step():
    assert "self.loss_is_scaled_for_ga" in inspect.getsource(Trainer.training_step)


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
