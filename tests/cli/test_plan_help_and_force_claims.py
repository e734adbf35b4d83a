"""`dpdm plan`'s help names PRV as a certifier, and `--force` takes any JSON with a
"digest" string for a plan."""
import json

from cli.main import main

SMALL = ("--steps", "5", "--delta", "1e-5", "--multiplicity", "1")


def test_plan_help_does_not_say_prv_certifies(capsys):
    """F1: `dpdm plan --help` said "Calibrate the smallest noise that meets (eps, delta), certified by RDP, PLD
    and PRV", while PRV never certifies (README "What the plan promises", docs/accounting.md "Why PRV never
    certifies"; the command's own table says "the smaller of PLD's and RDP's bounds")."""
    assert main(["plan", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    summary = text.split("Options:")[0]
    assert "certified by RDP and PLD (PRV a cross-check)" in summary, summary


def test_force_keeps_a_json_file_that_is_not_a_plan_even_if_it_has_a_digest(capsys, tmp_path):
    """F2: `--force` "replaces only another plan" (its help, README, test_plan.py), but a plan was recognised by
    a top-level "digest" string alone: an OCI descriptor (or any JSON with such a key) was called "a different
    plan (sha256:...)" and replaced by --force."""
    descriptor = tmp_path / "descriptor.json"
    text = json.dumps({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": "sha256:" + "ab" * 32, "size": 7143})
    descriptor.write_text(text)
    rc = main(["plan", *SMALL, "--noise-multiplier", "1", "--out", str(descriptor)])
    err = capsys.readouterr().err
    assert rc == 2 and "a different plan" not in err, err
    rc = main(["plan", *SMALL, "--noise-multiplier", "1", "--out", str(descriptor), "--force"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert descriptor.read_text() == text
