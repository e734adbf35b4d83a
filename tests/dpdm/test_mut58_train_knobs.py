"""mut58 (stop 55): the types of a training checkpoint's train knobs (`dpdm.checkpoint._TRAIN_KNOBS`, h145 F3,
stop 54), each pinned: the existing test covers six of them through a checkpoint; here every knob, its edges
(a count of 0, a segment of two values), and that a release file's config is not held to them."""

import dataclasses

import pytest

import dpdm.checkpoint as ckpt
from dpdm.train import TrainConfig

BAD = [("lr", [0.001], "a number"), ("lr", True, "a number"), ("lr_schedule", 3, "a schedule's name"),
       ("lr_segments", [[0, 0.001]], "null or a list of (first step, lr, schedule)"),
       ("lr_segments", [[0, 0.001, "constant", 1]], "null or a list of (first step, lr, schedule)"),
       ("lr_segments", [[0, [0.001], "constant"]], "null or a list of (first step, lr, schedule)"),
       ("per_layer_rules", 1, "true, false or null"), ("physical_batch", 0, "null or an integer >= 1"),
       ("checkpoint_every", 0, "an integer >= 1"), ("checkpoint_every", 2.0, "an integer >= 1"),
       ("log_every", [1], "an integer >= 1"), ("log_every", False, "an integer >= 1"),
       ("ema_decay", "0.999", "a number"), ("ema_powers", [0.05, "x"], "a list of numbers"),
       ("trainable", "conv", "null or a list of patterns"), ("subspace_dim", 0, "null or an integer >= 1"),
       ("subspace_data", 3, "null or a dataset's name"), ("subspace_every", 0, "an integer >= 1"),
       ("subspace_examples", -1, "an integer >= 1"), ("precision", None, "a precision's name")]


@pytest.mark.parametrize("key,value,what", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_each_train_knob_of_the_wrong_kind_is_named(key, value, what):
    train = {**dataclasses.asdict(TrainConfig()), key: value}
    assert ckpt._train_knobs_problem(train) == f"its config's train.{key} is {ckpt._value_text(value)}, not {what}"


def test_a_default_train_config_and_its_edges_are_of_their_kind():
    train = dataclasses.asdict(TrainConfig())
    assert ckpt._train_knobs_problem(train) is None
    for key, value in (("lr_segments", [[0, 0.001, "constant"], (10, 5e-4, "cosine")]), ("lr_segments", None),
                       ("physical_batch", 1), ("physical_batch", None), ("checkpoint_every", 1), ("lr", 1),
                       ("ema_powers", []), ("trainable", None), ("trainable", ["conv*"]), ("per_layer_rules", None)):
        assert ckpt._train_knobs_problem({**train, key: value}) is None, (key, value)
    assert ckpt._train_knobs_problem({}) is None   # a knob an older dpdm did not record is not there
