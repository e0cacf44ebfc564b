"""The notebook's CNN as an ``nn.Sequential`` with named modules.

>>> net = build_cnn()
>>> net(torch.zeros(4, 1, 28, 28)).shape
torch.Size([4, 10])
"""

from collections import OrderedDict

import torch
from torch import nn


def build_cnn(
    channels: tuple[int, int] = (32, 64),
    kernel_size: int = 5,
    hidden: int = 1024,
    dropout: float = 0.5,
    batch_norm: bool = False,
    batch_norm_fc: bool = False,
    image_size: int = 28,
    num_classes: int = 10,
    in_channels: int = 1,
) -> nn.Sequential:
    """conv1 relu1 pool1 conv2 relu2 pool2 flatten fc1 relu3 dropout fc2, as in the notebook.

    ``in_channels``, ``image_size`` and ``num_classes`` come from the data (the module passes
    them). ``batch_norm=True`` adds bn1/bn2 after each convolution (used by ``experiment=best``),
    ``batch_norm_fc=True`` bn3 after fc1.
    """
    c1, c2 = channels
    pad = kernel_size // 2
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(in_channels, c1, kernel_size, padding=pad))
    ]
    if batch_norm:
        layers.append(("bn1", nn.BatchNorm2d(c1)))
    layers += [("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2))]
    layers.append(("conv2", nn.Conv2d(c1, c2, kernel_size, padding=pad)))
    if batch_norm:
        layers.append(("bn2", nn.BatchNorm2d(c2)))
    layers += [("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)), ("flatten", nn.Flatten())]
    features = c2 * (image_size // 4) ** 2
    layers.append(("fc1", nn.Linear(features, hidden)))
    if batch_norm_fc:
        layers.append(("bn3", nn.BatchNorm1d(hidden)))
    layers += [
        ("relu3", nn.ReLU()),
        ("dropout", nn.Dropout(dropout)),
        ("fc2", nn.Linear(hidden, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv 6@5x5, pool, conv 16@5x5, pool, 120, 84, classes.

    >>> LeNet5(num_classes=3, in_channels=3, image_size=32)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, dropout=0.0
    ):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = (image_size // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
