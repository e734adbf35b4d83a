"""Downstream classifiers of the paper's evaluation (research/dpdm.md section 4).

Architectures follow DPDM's ``train_downstream_classifiers.py``, generalized to any image size and
channel count:

- `LogReg`: Linear(C*H*W -> classes).
- `MLP`: Linear(C*H*W -> 100) -> ReLU -> Linear(100 -> classes).
- `CNN`: Conv(C->32, 3) -> MaxPool2 -> ReLU -> Drop 0.5 -> Conv(32->64, 3) -> MaxPool2 -> ReLU ->
  Drop 0.5 -> Conv(64->128, 3) -> ReLU -> Flatten -> FC(-> 128) -> ReLU -> Drop 0.5 -> FC(128 ->
  classes). On 28x28 the flattened size is 1152, as in the paper. Images smaller than 28 pixels
  (e.g. 8x8 digits) use padding 1 so that the feature maps do not vanish; the two MaxPool2 layers
  still need `CNN_MIN_SIDE` (4) pixels a side.

``CNN(group_norm=True, dropout=0.0)`` is the DP-SGD variant used by the baseline: GroupNorm after
each convolution (per-example, so DP-SGD's per-example gradients stay independent) and no dropout
(a random op, which the engine's vmap refuses).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CNN", "CNN_MIN_SIDE", "LogReg", "MLP", "build_classifier", "CLASSIFIERS"]

CNN_MIN_SIDE = 4   # the CNN's two MaxPool2 layers leave no pixel of a smaller side


class LogReg(nn.Module):
    def __init__(self,
                 img_channels: int,     # C of the input images.
                 img_resolution: int | tuple[int, int],  # H (= W), or (H, W).
                 num_classes: int,      # Number of output logits.
                 ) -> None:
        super().__init__()
        self.fc = nn.Linear(img_channels * _area(img_resolution), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    def __init__(self,
                 img_channels: int,     # C of the input images.
                 img_resolution: int | tuple[int, int],  # H (= W), or (H, W).
                 num_classes: int,      # Number of output logits.
                 hidden: int = 100,     # Width of the hidden layer (paper: 100).
                 ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(img_channels * _area(img_resolution), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CNN(nn.Module):
    def __init__(self,
                 img_channels: int,         # C of the input images.
                 img_resolution: int | tuple[int, int],  # H (= W), or (H, W).
                 num_classes: int,          # Number of output logits.
                 dropout: float = 0.5,      # Dropout probability (paper: 0.5; 0 for DP-SGD).
                 group_norm: bool = False,  # GroupNorm after each conv (DP-SGD baseline).
                 ) -> None:
        super().__init__()
        h, w = _hw(img_resolution)
        if min(h, w) < CNN_MIN_SIDE:
            raise ValueError(f"the CNN needs images of at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE} pixels, not {h}x{w}")
        pad = 0 if min(h, w) >= 28 else 1

        def drop() -> nn.Module:
            return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        def norm(ch: int) -> nn.Module:
            return nn.GroupNorm(min(8, ch), ch) if group_norm else nn.Identity()

        self.conv = nn.Sequential(
            nn.Conv2d(img_channels, 32, 3, padding=pad), norm(32), nn.MaxPool2d(2), nn.ReLU(), drop(),
            nn.Conv2d(32, 64, 3, padding=pad), norm(64), nn.MaxPool2d(2), nn.ReLU(), drop(),
            nn.Conv2d(64, 128, 3, padding=pad), norm(128), nn.ReLU(),
        )
        with torch.no_grad():
            n_flat = self.conv(torch.zeros(1, img_channels, h, w)).numel()
        self.fc1 = nn.Linear(n_flat, 128)  # 1152 -> 128 on 28x28
        self.drop = drop()
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, 128] (the space of the classifier Frechet distance)."""
        return torch.relu(self.fc1(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.features(x)))


def _hw(img_resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(img_resolution, int):
        return img_resolution, img_resolution
    h, w = img_resolution
    return int(h), int(w)


def _area(img_resolution: int | tuple[int, int]) -> int:
    h, w = _hw(img_resolution)
    return h * w


CLASSIFIERS = {"logreg": LogReg, "mlp": MLP, "cnn": CNN}


def build_classifier(kind: str, *, img_channels: int, img_resolution: int | tuple[int, int],
                     num_classes: int) -> nn.Module:
    """One of "logreg", "mlp", "cnn" with the paper's settings."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"classifier={kind!r} must be one of {tuple(CLASSIFIERS)}")
    return CLASSIFIERS[kind](img_channels, img_resolution, num_classes)
