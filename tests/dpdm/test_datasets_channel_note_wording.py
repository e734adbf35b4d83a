"""userwalk N4 (stop 56): the channel-count line said "(one colour-mode image holding colour makes them all RGB)" of a
folder whose images are all RGB, reading as if the folder were mixed; it says what the folder holds."""
from __future__ import annotations

import numpy as np
from PIL import Image


def _folder(root, mode):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            shape = (8, 8, 3) if mode == "RGB" else (8, 8)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return f"folder:{root}"


def test_the_channel_note_of_an_unmixed_folder_says_what_it_holds(tmp_path):
    from dpdm.datasets import inferred_channels_note, load_dataset

    rgb = inferred_channels_note(load_dataset(_folder(tmp_path / "rgb", "RGB"), "train"))
    assert "was read off the private images (every image is in a colour mode), and the model" in rgb, rgb
    assert "makes them all RGB" not in rgb, rgb
    grey = inferred_channels_note(load_dataset(_folder(tmp_path / "grey", "L"), "train"))
    assert ("(1, grayscale) was read off the private images (every image is grayscale; one colour-mode image holding "
            "colour would make them all RGB)") in grey, grey
