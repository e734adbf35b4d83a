"""userwalk F1 (stop 56): `dpdm plan --dataset npz:own.npz` (the README's own-data example) records a relative path,
which `dpdm sample` copies into the samples (`meta_dataset`; the samples are released files, so the name stays as
the plan gave it). `dpdm eval` run from another folder, with --dataset naming that same file by a path valid there,
told the user three contradicting things: the test images "are checked against" the relative path as read here,
then that data "cannot be read here ... not checked against it", and then that the model trained on "other data"
than --dataset. Eval cannot know the folder the plan was made in: it says it cannot tell, and says "checked
against" only of data it read."""
from __future__ import annotations

import numpy as np
import pytest

from cli.main import main


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.round(d.images * 255 / 16), 0, 255).astype(np.uint8)[:, None]
    return x, d.target.astype(np.int64)


def _setup(tmp_path, digits, recorded="npz:own.npz"):
    x, y = digits
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    np.savez(data / "own.npz", x=x[:600], y=y[:600])          # what the model trained on, planned as npz:own.npz
    np.savez(data / "own_test.npz", x=x[600:900], y=y[600:900])
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=x[900:1300], y=y[900:1300], meta_private=np.array(True), meta_seed_given=np.array(False),
             meta_epsilon=np.array(2.0), meta_delta=np.array(1e-5), meta_dataset=np.array(recorded))
    return data, elsewhere, samples


def _eval(tmp_path, samples, dataset, test_dataset, capsys, *more):
    code = main(["eval", "--samples", str(samples), "--dataset", dataset, "--test-dataset", test_dataset,
                 "--classifiers", "", "--reference-epochs", "1", "--cache-dir", str(tmp_path / "cache"), *more])
    err = capsys.readouterr().err
    assert code == 0, err
    return [ln for ln in err.splitlines() if ln.startswith("dpdm: warning: the samples' model")]


def test_eval_from_another_folder_does_not_call_the_same_data_other_data(tmp_path, digits, capsys, monkeypatch):
    _, elsewhere, samples = _setup(tmp_path, digits)
    monkeypatch.chdir(elsewhere)            # the user evaluates from another folder, naming the same file
    lines = _eval(tmp_path, samples, "npz:../data/own.npz", "npz:../data/own_test.npz", capsys)
    # One line on the test images (not checked: nothing read), one on --dataset (cannot tell), no claim of other data
    # and no "checked against" a path that was not read.
    assert lines == [
        "dpdm: warning: the samples' model trained on 'npz:own.npz', a relative path that cannot be read here "
        "(npz:own.npz: file 'own.npz' does not exist); the test images of 'npz:../data/own_test.npz' are not checked "
        "against it",
        "dpdm: warning: the samples' model trained on 'npz:own.npz', a relative path that names nothing from this "
        "folder: eval cannot tell whether --dataset='npz:../data/own.npz' is that data; if it is not, the classifier "
        "FD and precision/recall measure them against other data"], lines


def test_eval_relative_name_that_reads_other_data_here_is_checked_and_said_uncertain(tmp_path, digits, capsys,
                                                                                       monkeypatch):
    x, y = digits
    _, elsewhere, samples = _setup(tmp_path, digits)
    np.savez(elsewhere / "own.npz", x=x[1300:1500], y=y[1300:1500])   # another own.npz where eval runs
    monkeypatch.chdir(elsewhere)
    lines = _eval(tmp_path, samples, "npz:../data/own.npz", "npz:../data/own_test.npz", capsys)
    assert lines == [
        "dpdm: warning: the samples' model trained on 'npz:own.npz', a relative path; the test images are checked "
        f"against {str(elsewhere / 'own.npz')!r}, as read from this folder",
        "dpdm: warning: the samples' model trained on 'npz:own.npz', a relative path that from this folder names "
        "other data than --dataset: eval cannot tell whether --dataset='npz:../data/own.npz' is that data; if it is "
        "not, the classifier FD and precision/recall measure them against other data"], lines


def test_eval_relative_name_from_the_plans_folder_is_no_warning(tmp_path, digits, capsys, monkeypatch):
    data, _, samples = _setup(tmp_path, digits)
    monkeypatch.chdir(data)   # where the plan was made: the recorded name is --dataset's file, however spelt
    for dataset in ("npz:own.npz", f"npz:{data / 'own.npz'}", "npz:./own.npz"):
        assert _eval(tmp_path, samples, dataset, "npz:own_test.npz", capsys) == [], dataset


def test_eval_absolute_other_data_is_still_called_other_data(tmp_path, digits, capsys, monkeypatch):
    x, y = digits
    elsewhere = tmp_path / "elsewhere"
    data, _, samples = _setup(tmp_path, digits, recorded=f"npz:{elsewhere / 'public.npz'}")
    np.savez(elsewhere / "public.npz", x=x[1300:1500], y=y[1300:1500])
    monkeypatch.chdir(tmp_path)
    lines = _eval(tmp_path, samples, f"npz:{data / 'own.npz'}", f"npz:{data / 'own_test.npz'}", capsys)
    assert lines == [f"dpdm: warning: the samples' model trained on 'npz:{elsewhere / 'public.npz'}', not "
                     f"--dataset='npz:{data / 'own.npz'}': the classifier FD and precision/recall measure them "
                     "against other data"], lines
