"""mut59 (stop 55): the CLI's torchrun refusal reads WORLD_SIZE as `dpdm.distributed.launched_by_torchrun` does (its
docstring's promise): a WORLD_SIZE that is no count (a stray "", "two", "-1") is no single process, for `dpdm train`'s
launch checks as for the refusal; the tests set only "2" and " 1 "."""
from __future__ import annotations

import pytest

VALUES = ["", " ", "two", "-1", "2.0", "0x2", "2", " 3 ", "1", " 1 ", "0", "01"]


@pytest.mark.parametrize("value", VALUES)
def test_the_cli_reads_world_size_as_dpdm_distributed_does(monkeypatch, value):
    import cli.main
    from dpdm import distributed

    monkeypatch.setenv("WORLD_SIZE", value)
    assert cli.main._launched_by_torchrun() == distributed.launched_by_torchrun()
    assert cli.main._launched_by_torchrun() == (value.strip() not in ("1", "0", "01"))


@pytest.mark.parametrize("value", ["", "two", "-1"])
def test_a_world_size_that_is_no_count_refuses_a_command_other_than_train(tmp_path, monkeypatch, capsys, value):
    from cli.main import main

    monkeypatch.setenv("WORLD_SIZE", value)
    rc = main(["account", "-s", "1", "-p", "0.01", "-i", "10", "--delta", "1e-5"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"dpdm: error: dpdm account runs in one process, not under torchrun (WORLD_SIZE={value!r})"), err
