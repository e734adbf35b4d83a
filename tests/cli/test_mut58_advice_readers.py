"""mut58 (stop 55): the torch-free advice readers of a run folder (`cli._common.recorded_plan_steps`: plan.json;
`cli.train._unsaved_lr_change`: config.json) say nothing of a file that parses to no mapping they can read, as
they say nothing of a FIFO or an oversized file (h145 F1, stop 54), rather than raise inside the hint or the resume."""

import json


def test_a_plan_json_nested_past_the_recursion_limit_reads_as_no_plan(tmp_path):
    from cli._common import recorded_plan_steps

    (tmp_path / "plan.json").write_text("[" * 200_000 + "]" * 200_000)   # 400 kB, under the cap
    assert recorded_plan_steps(str(tmp_path)) is None
    (tmp_path / "plan.json").write_text(json.dumps({"steps": 6}))
    assert recorded_plan_steps(str(tmp_path)) == 6


def test_a_config_json_whose_train_is_no_mapping_or_nested_too_deep_says_nothing(tmp_path):
    from cli.train import _unsaved_lr_change

    train_cfg = {"lr": 0.001, "lr_schedule": "constant"}
    for text in (json.dumps({"train": [1]}), json.dumps({"train": "x"}), json.dumps({"train": 3}),
                 json.dumps([1]), "[" * 200_000 + "]" * 200_000):
        (tmp_path / "config.json").write_text(text)
        assert _unsaved_lr_change(str(tmp_path), train_cfg) == [], text[:40]
    (tmp_path / "config.json").write_text(json.dumps({"train": {"lr": 0.5, "lr_schedule": "constant"}}))
    assert _unsaved_lr_change(str(tmp_path), train_cfg)[0].startswith("config.json shows lr 0.5 (constant)")
