"""mut58 (stop 55): `dpdm plan --out` beside a run's record of steps (`cli.plan._refuse_to_replace`,
`_lost_plan_problem`), pinned where the existing tests left a mutant alive."""

import json
import os

from cli.main import main

SMALL = ("--dataset-size", "40", "--batch-size", "8", "--steps", "5", "--multiplicity", "1", "--delta", "1e-5")


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_dangling_link_at_out_is_kept_not_written_through(capsys, tmp_path):
    """A link whose target is gone is something at --out (`os.path.lexists`), not a plan.json that is gone: it is
    refused as not a regular file and kept, as a FIFO or /dev/zero there is, and nothing is made at its target."""
    link = tmp_path / "plan.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    for force in ((), ("--force",)):
        rc, _, err = run(capsys, *SMALL, "--noise-multiplier", "1", "--out", str(link), *force)
        assert rc == 2 and err.count("\n") == 1 and "exists and is not a regular file" in err, err
        assert link.is_symlink() and not (tmp_path / "elsewhere.json").exists()


def test_a_lost_plan_json_is_written_back_only_where_record_and_checkpoint_agree_on_it(capsys, tmp_path,
                                                                                        monkeypatch):
    """RUN/plan.json removed beside a `.steps_done` of steps and a checkpoint.pt whose ledger names a plan (here
    `_ledger_plan`, stubbed: a finished run's checkpoint). Each of the two that names a plan must name this one:
    a ledger of another plan refuses it beside a v1 record (which names none) and beside a v2 record naming this
    plan; a v2 record of another plan refuses it beside a ledger of this plan; a v1 record with a ledger of this
    plan writes it (`dpdm export` asks for it back). With or without --force."""
    import cli.plan as plan_cli

    path = tmp_path / "plan.json"
    args = (*SMALL, "--noise-multiplier", "1", "--out", str(path))
    rc, out, err = run(capsys, *args, "--json")
    assert rc == 0, err
    digest = json.loads(out)["digest"]
    other = "sha256:" + "ab" * 32
    v1 = "dpdm-steps-run v1 3 0123456789abcdef 0.0003 constant"
    v2 = "dpdm-steps-run v2 3 0123456789abcdef 0.0003 constant {} 0123456789abcdef"
    cases = [(v1, other, f"was trained under plan {other[:19]}..., not this plan ({digest[:19]}...)"),
             (v2.format(digest[7:23]), other, f"was trained under plan {other[:19]}..., not this plan"),
             (v2.format(other[7:23]), digest, f"trained 3 steps under plan sha256:{other[7:23]}... (.steps_done "
                                              f"records them), not this plan ({digest[:19]}...)"),
             (v1, digest, None), (v2.format(digest[7:23]), digest, None), (v2.format(digest[7:23]), None, None)]
    for line, ledger, refused in cases:
        monkeypatch.setattr(plan_cli, "_ledger_plan", lambda checkpoint, ledger=ledger: ledger)
        (tmp_path / ".steps_done").write_bytes(line.encode().ljust(127) + b"\n")
        for force in ((), ("--force",)):
            path.unlink(missing_ok=True)
            rc, out, err = run(capsys, *args, *force)
            if refused:
                assert rc == 2 and err.count("\n") == 1 and not path.exists(), (line, ledger, err)
                assert err.startswith(f"dpdm: error: --out {path} would be the plan.json of a run whose plan.json "
                                      "is gone, and ") and refused in err, (line, ledger, err)
            else:
                assert rc == 0 and err == "" and f"({digest[:19]}...)" in out, (line, ledger, err)
