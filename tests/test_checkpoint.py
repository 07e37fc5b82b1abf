"""The selected (best-validation) checkpoint survives any number of interruptions.

Orbax's `BestN` forgets the metrics of checkpoints an earlier process saved, so kdjax once lost the
best checkpoint at the first save after a resume (and the stage then died at its end). Here the
checkpoint folder keeps the latest N plus the step the stage's own meta selects.
"""

import os
import shutil

import jax.numpy as jnp
import pytest

from kdjax import checkpoint as kckpt
from kdjax import train
from tests.test_train import tiny_digits_config


def _meta(best_step):
    return {"history": [], "best_step": best_step, "best_score": 0.0}


def test_selected_step_survives_a_new_manager(tmp_path):
    """The issue's reproduction: steps 1-3 with the best at 1 and keep=1, then a new manager
    (a resumed process) saves step 4: step 1 must still be there."""
    state = {"w": jnp.zeros(3)}
    ckpts = kckpt.StageCheckpoints(str(tmp_path), keep=1, asynchronous=False)
    for step in (1, 2, 3):
        ckpts.save(step, state, _meta(1))
    ckpts.close()
    assert kckpt.StageCheckpoints(str(tmp_path)).all_steps() == [1, 3]
    ckpts = kckpt.StageCheckpoints(str(tmp_path), keep=1, asynchronous=False)
    ckpts.save(4, state, _meta(1))
    assert ckpts.all_steps() == [1, 4]
    ckpts.save(5, state, _meta(5))  # a new best replaces the old one once it is saved
    assert ckpts.all_steps() == [5]
    ckpts.close()


class _Interrupt(Exception):
    pass


# 12 teacher epochs of 15 steps with a validation split: the best validation epoch is 8 (step 120),
# so with keep=2 an interruption after epoch 11 leaves it outside the latest two checkpoints.
RECIPE = {"teacher.epochs": 12, "dataset.val_size": 0.3, "optimizer.learning_rate": 0.03}
SELECTED = ("selected_epoch", "selected_val_accuracy", "selected_test_accuracy", "test_accuracy",
            "val_accuracy", "best_test_accuracy")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return train.run(tiny_digits_config(stages="teacher", **RECIPE), workdir)["teacher"]


def _interrupted_run(workdir, at_epochs):
    """Stops the teacher after each epoch of `at_epochs` (each time in a new CheckpointManager),
    then runs it to the end."""
    config = tiny_digits_config(stages="teacher", **RECIPE)
    for stop in at_epochs:
        def on_epoch(role, row, stop=stop):
            if row["epoch"] == stop:
                raise _Interrupt
        with pytest.raises(_Interrupt):
            train.run(config, workdir, on_epoch=on_epoch)
    return train.run(config, workdir)["teacher"]


def test_resumed_run_selects_the_same_epoch_as_an_uninterrupted_one(tmp_path, uninterrupted):
    best = uninterrupted["selected_epoch"]
    assert best <= 12 - 3, "the recipe must select an epoch that ages out of the latest 2 checkpoints"
    result = _interrupted_run(str(tmp_path), at_epochs=sorted({best + 1, best + 2, 11}))
    assert {k: result[k] for k in SELECTED} == {k: uninterrupted[k] for k in SELECTED}
    steps = kckpt.StageCheckpoints(str(tmp_path / "teacher" / "checkpoints")).all_steps()
    assert steps == [best * 15, 165, 180]


def test_a_run_that_already_lost_its_selected_checkpoint_says_so(tmp_path, uninterrupted):
    """A run broken by an older kdjax: one line naming the lost step and what to do, before any
    training (not a traceback after the last epoch)."""
    workdir = str(tmp_path)
    config = tiny_digits_config(stages="teacher", **RECIPE)
    best_step = uninterrupted["selected_epoch"] * 15

    def stop(role, row):
        if row["epoch"] == 11:
            raise _Interrupt
    with pytest.raises(_Interrupt):
        train.run(config, workdir, on_epoch=stop)
    shutil.rmtree(os.path.join(workdir, "teacher", "checkpoints", str(best_step)))
    with pytest.raises(ValueError, match=rf"selected checkpoint of stage 'teacher' \(step {best_step}, epoch "
                                         rf"{best_step // 15}.*missing.*move .*teacher aside and rerun") as err:
        train.run(config, workdir)
    assert "\n" not in str(err.value)
    assert not os.path.isdir(os.path.join(workdir, "teacher", "checkpoints", "180"))  # stopped before training
