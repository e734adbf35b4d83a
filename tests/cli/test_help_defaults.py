"""`dpdm CMD --help` gives each option's default (README: "gives every flag with its default"), as values, not as
the names of Python constants. The values that cli/ repeats so that --help does not import torch are pinned here to
their sources (helper-71 F6)."""
import re

import pytest


def _help(capsys, *argv) -> str:
    from cli.main import main

    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())     # click's line wrapping undone


def test_baseline_help_gives_the_lr_default_as_a_value(capsys):
    # It said "[default: dpdm.baseline.DEFAULT_LR]", a name no user can read a number from.
    from dpdm.baseline import DEFAULT_LR

    text = _help(capsys, "baseline", "dp-classifier")
    [lr] = re.findall(r"--lr FLOAT RANGE Adam learning rate \(privacy-neutral\) \[default: ([^]]+)\]", text)
    assert float(lr) == DEFAULT_LR
    assert "DEFAULT_LR" not in text


def test_baseline_help_says_it_spends_its_own_budget(capsys):
    # "Baselines that spend the same privacy budget as the diffusion model" read as sharing the generator's budget;
    # run on the same private data, the baseline is a second release, whose epsilon composes with it (h109 F2).
    text = _help(capsys, "baseline")
    assert "the same privacy budget" not in text
    assert "a baseline is a second release of it, and its epsilon composes with the generator's" in text, text
    text = _help(capsys, "baseline", "dp-classifier")
    assert "it does not share the generator's budget" in text and "spent again, on top of the generator's" in text


@pytest.mark.parametrize("flag, key", [("--canaries", "num_canaries"), ("--steps", "max_steps"),
                                       ("--background", "background_size")])
def test_audit_help_gives_the_suites_values(capsys, flag, key):
    # "Override the suite's ..." without the suite's values: the README gave only the quick suite's 200 canaries.
    from audits.suite import SUITES

    text = _help(capsys, "audit")
    [default] = re.findall(rf"{flag} INTEGER(?: RANGE)? [^[]*\[default: ([^]]+)\]", text)
    quick, full = SUITES["quick"][key], SUITES["full"][key]
    assert f"quick {quick:,}" in default or f"up to {quick:,}" in default, default
    if full is None:   # the plan's steps; all of the data
        assert "full the plan's steps" in default or "full all of" in default, default
    else:
        assert f"full {full:,}" in default, default


def test_eval_help_gives_the_cache_folders_default_with_its_variable(capsys, monkeypatch, tmp_path):
    # It said "[default: ~/.cache/dpdm]" without $DPDM_CACHE, which takes precedence (h97 F4, stop 48); --data-root
    # names $DPDM_DATA the same way. Pinned to dpdm.evaluate.default_cache_dir.
    from pathlib import Path

    from dpdm.evaluate import default_cache_dir

    text = _help(capsys, "eval")
    [default] = re.findall(r"--cache-dir DIRECTORY Where the reference CNN is cached \[default: ([^]]+)\]", text)
    variable, fallback = default.split(", else ")
    monkeypatch.setenv(variable.removeprefix("$"), str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(variable.removeprefix("$"))
    assert default_cache_dir() == Path(fallback).expanduser()
