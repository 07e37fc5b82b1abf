"""Transfer learning: class subsets and few-shot data, initialising from another run (with a new
head), frozen parameters and BatchNorm statistics, and the mismatch error."""

import json
import os

import jax
import numpy as np
import pytest

from kdjax import data as kdata
from kdjax import optim
from kdjax import checkpoint as kckpt
from kdjax import runs, train
from tests.test_train import final_params, tiny_digits_config

LOWER = "0,1,2,3,4"
UPPER = "5,6,7,8,9"


def transfer_config(**overrides):
    return tiny_digits_config(stages="teacher", batch_size=10, **{
        "teacher.model": "cnn_tiny", "dataset.classes": UPPER, "dataset.train_per_class": 10, **overrides})


def test_class_subsets_and_few_shot_are_seeded_and_relabelled():
    full = kdata.load("digits")
    sub = kdata.load("digits", classes=(7, 3), train_per_class=5, seed=3)
    assert sub.num_classes == 2 and sub.mean == full.mean and sub.std == full.std
    assert np.bincount(sub.train.labels).tolist() == [5, 5]
    # relabelled in the given order: 7 -> 0, 3 -> 1; the test split keeps every example of both
    assert np.bincount(sub.test.labels).tolist() == [np.sum(full.test.labels == 7), np.sum(full.test.labels == 3)]
    for image, label in zip(sub.train.images, sub.train.labels):
        matches = [full.train.labels[i] for i in np.flatnonzero((full.train.images == image).all(axis=(1, 2, 3)))]
        assert (7, 3)[label] in matches
    again = kdata.load("digits", classes=(7, 3), train_per_class=5, seed=3)
    other = kdata.load("digits", classes=(7, 3), train_per_class=5, seed=4)
    assert np.array_equal(again.train.images, sub.train.images)
    assert not np.array_equal(other.train.images, sub.train.images)
    with pytest.raises(kdata.DataError, match="distinct class ids"):
        kdata.load("digits", classes=(3, 3))
    with pytest.raises(kdata.DataError, match="train_per_class=500"):
        kdata.load("digits", classes=(3,), train_per_class=500)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    train.run(tiny_digits_config(stages="teacher", **{"teacher.model": "cnn_tiny", "dataset.classes": LOWER}),
              workdir)
    return workdir


def test_init_from_run_with_a_new_head_and_frozen_body(pretrained, tmp_path):
    workdir = str(tmp_path / "probe")
    train.run(transfer_config(**{"init.from_run": pretrained, "init.reinit": "head",
                                 "optimizer.freeze": "^(?!head/)"}), workdir)
    source, *_ = runs.read_stage_variables(pretrained, "teacher")
    ckpt_step, params = final_params(workdir, "teacher")
    assert ckpt_step == 5  # 50 few-shot examples / batch 10, one epoch
    flat_src, flat_new = optim.flat_paths(source), optim.flat_paths({"params": params["student"]})
    for path, value in flat_new.items():
        if "/head/" in path:
            assert not np.array_equal(value, flat_src[path])  # re-initialised, then trained
        else:  # frozen body: bit-identical to the pretrained run's parameters
            np.testing.assert_array_equal(value, flat_src[path], err_msg=path)
    ckpts = kckpt.StageCheckpoints(os.path.join(workdir, "teacher", "checkpoints"))
    state, _ = ckpts.restore(ckpt_step)
    ckpts.close()
    jax.tree.map(np.testing.assert_array_equal, state["model_state"]["student"]["batch_stats"],
                 source["batch_stats"])  # frozen layers' BatchNorm statistics stay as they were


def test_init_from_run_fine_tunes_everything_by_default(pretrained, tmp_path):
    workdir = str(tmp_path / "finetune")
    train.run(transfer_config(**{"init.from_run": pretrained, "init.reinit": "head"}), workdir)
    source, *_ = runs.read_stage_variables(pretrained, "teacher")
    _, params = final_params(workdir, "teacher")
    flat_src, flat_new = optim.flat_paths(source), optim.flat_paths({"params": params["student"]})
    changed = [p for p in flat_new if not np.array_equal(flat_new[p], flat_src[p])]
    assert len(changed) == len(flat_new)  # every parameter trained
    scratch = train.run(transfer_config(), str(tmp_path / "scratch"))
    assert json.load(open(os.path.join(workdir, "summary.json")))["teacher"]["model"] == scratch["teacher"]["model"]


def test_transfer_mismatch_is_one_line_listing_paths(pretrained, tmp_path):
    # Three classes: the pretrained 5-class head does not fit and is not re-initialised.
    config = transfer_config(**{"init.from_run": pretrained, "dataset.classes": "5,6,7"})
    with pytest.raises(ValueError, match=r"head/bias \(3,\) vs \(5,\).*init\.reinit") as err:
        train.run(config, str(tmp_path / "bad"))
    assert "\n" not in str(err.value)
    assert not os.path.exists(os.path.join(tmp_path, "bad"))  # refused before anything is written
    other_arch = transfer_config(**{"init.from_run": pretrained, "teacher.model": "mlp"})
    with pytest.raises(ValueError, match="do not match .*fc1/kernel"):
        train.run(other_arch, str(tmp_path / "bad2"))


def test_bad_regex_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"config.optimizer.freeze='\(' is not a valid regular expression"):
        train.run(transfer_config(**{"optimizer.freeze": "("}), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")
