"""Training-split sizes of the named datasets (torch-free: `dpdm plan` reads it without torch).

A plan's dataset_size must equal these for `dpdm train` to accept the data."""
DATASET_SIZES: dict[str, int] = {
    "mnist5k": 4000,
    "digits": 1797,
    "digits28": 1797,
    "digits28-aug": 17970,
    "mnist": 60000,
    "fashion-mnist": 60000,
    "cifar10": 50000,
    "celeba": 162770,
}
