"""userwalk N5 (stop 56): eval's progress lines and its report said "1 epochs" ("training the reference CNN on
npz:own.npz (600 images, 1 epochs, without privacy)"); one epoch is "1 epoch", more are "epochs"."""
from __future__ import annotations

import numpy as np

from cli.main import main


def test_eval_says_1_epoch_and_2_epochs(tmp_path, capsys):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.round(d.images * 255 / 16), 0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    for name, sl in (("train", slice(0, 600)), ("test", slice(600, 900)), ("samples", slice(900, 1300)),
                     ("public", slice(1300, 1500))):
        np.savez(tmp_path / f"{name}.npz", x=x[sl], y=y[sl])
    common = ["eval", "--samples", str(tmp_path / "samples.npz"), "--dataset", f"npz:{tmp_path / 'train.npz'}",
              "--test-dataset", f"npz:{tmp_path / 'test.npz'}", "--classifiers", "logreg",
              "--public-pretrain", f"npz:{tmp_path / 'public.npz'}", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache")]
    for n, said in ((1, "1 epoch"), (2, "2 epochs")):
        code = main([*common, "--epochs", str(n), "--public-epochs", str(n), "--reference-epochs", str(n)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert f"(600 images, {said}, without privacy)" in err, err
        assert f"training logreg: {said} on public npz:{tmp_path / 'public.npz'}, then 400 synthetic images ({said})" \
            in err, err
        assert f"classifiers first trained {said} on public" in out, out
        assert "1 epochs" not in out + err
