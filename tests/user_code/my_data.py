"""A researcher's own datamodule, outside the package: the first digits of MNIST, three classes."""

import lightning as L
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST


class FirstDigits(L.LightningDataModule):
    classes = ["zero", "one", "two"]  # what the model is told about the data
    channels, image_size = 1, 28

    def __init__(self, data_dir: str, per_split: int = 256, batch_size: int = 32):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage=None):
        data = MNIST(self.hparams.data_dir, train=True)
        keep = data.targets < 3
        x, y = data.data[keep][:, None].float() / 255, data.targets[keep]
        n = self.hparams.per_split
        self.splits = [
            TensorDataset(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(3)
        ]

    def train_dataloader(self):
        return DataLoader(self.splits[0], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.splits[1], batch_size=256)

    def test_dataloader(self):
        return DataLoader(self.splits[2], batch_size=256)
