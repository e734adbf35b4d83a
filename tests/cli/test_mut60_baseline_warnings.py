"""Kill tests of mut60 (stop 56) for 55f2125: every data warning of `dpdm baseline dp-classifier` is said before its
first private step, not only the "not the plan's data" one the suite pinned (mut60 b6, b7: moving the class-count or
the EXIF warning back after the training survived)."""
from __future__ import annotations

import numpy as np
import torch

from tests.cli.test_eval_baseline import _plan, _run, digit_files  # noqa: F401  (the fixture)


def _stub_steps(monkeypatch, capsys):
    import dpdm.engine as engine

    steps = []

    def stub(model, *args, **kwargs):
        steps.append(capsys.readouterr().err)   # what was said before this step
        return {k: torch.zeros_like(p) for k, p in model.named_parameters()}

    monkeypatch.setattr(engine, "private_grad", stub)
    return steps


def test_the_class_count_read_off_the_private_labels_is_warned_of_before_the_first_step(digit_files, tmp_path,
                                                                                        capsys, monkeypatch):
    steps = _stub_steps(monkeypatch, capsys)
    path = _plan(tmp_path, 600, f"npz:{digit_files['train']}", steps=2)   # its npz states no class count
    code, out, err = _run(capsys, "baseline", "dp-classifier", "--plan", str(path), "--device", "cpu", "--quiet",
                          "--test-dataset", f"npz:{digit_files['test']}")
    assert code == 0 and len(steps) == 2, err
    assert "the number of classes (10) was read from the private labels" in steps[0], steps[0]
    assert "read from the private labels" not in "".join(steps[1:]) + err, err


def test_an_exif_tagged_image_is_warned_of_before_the_first_step(digit_files, tmp_path, capsys, monkeypatch):
    from PIL import Image

    with np.load(digit_files["train"]) as z:
        x, y = z["x"][:40], z["y"][:40]
    for i, (img, label) in enumerate(zip(x, y)):
        (tmp_path / "d" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0], mode="L").save(tmp_path / "d" / str(label) / f"{i}.png")
    tagged = tmp_path / "d" / str(y[1]) / "1.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(x[1, 0], mode="L").save(tagged, exif=exif)
    name = f"folder:{tmp_path / 'd'}"
    path = _plan(tmp_path, 40, name, steps=2, batch_size=8)
    steps = _stub_steps(monkeypatch, capsys)
    code, _, err = _run(capsys, "baseline", "dp-classifier", "--plan", str(path), "--device", "cpu", "--quiet",
                        "--test-dataset", f"npz:{digit_files['test']}")
    assert code == 0 and len(steps) == 2, err
    assert f"--dataset={name!r}: 1 of its 40 images carries an EXIF orientation tag" in steps[0], steps[0]
    assert "EXIF" not in "".join(steps[1:]) + err, err
