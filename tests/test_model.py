import torch
from torch import nn

from mnist_cnn.model import build_cnn
from mnist_cnn.module import Classifier

NAMES = [
    "conv1",
    "relu1",
    "pool1",
    "conv2",
    "relu2",
    "pool2",
    "flatten",
    "fc1",
    "relu3",
    "dropout",
    "fc2",
]


def test_module_names_and_order():
    net = build_cnn()
    assert [name for name, _ in net.named_children()] == NAMES
    assert (net.conv1.in_channels, net.conv1.out_channels, net.conv1.kernel_size) == (1, 32, (5, 5))
    assert net.conv1.padding == (2, 2) and net.conv2.padding == (2, 2)
    assert (net.conv2.in_channels, net.conv2.out_channels) == (32, 64)
    assert (net.fc1.in_features, net.fc1.out_features) == (3136, 1024)
    assert (net.fc2.in_features, net.fc2.out_features) == (1024, 10)
    assert net.dropout.p == 0.5


def test_shapes_through_the_network():
    net = build_cnn().eval()
    x = torch.zeros(4, 1, 28, 28)
    assert net[:6](x).shape == (4, 64, 7, 7)  # after pool2
    assert net[:7](x).shape == (4, 3136)  # after flatten
    assert net(x).shape == (4, 10)


def test_fc1_input_is_computed_from_the_options():
    net = build_cnn(channels=(8, 16), kernel_size=3, hidden=128, dropout=0.25)
    assert net.fc1.in_features == 16 * 7 * 7
    assert net.fc1.out_features == 128 and net.dropout.p == 0.25
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_batch_norm_variant_adds_bn_after_each_conv():
    names = [n for n, _ in build_cnn(batch_norm=True).named_children()]
    assert names[:2] == ["conv1", "bn1"] and names[names.index("conv2") + 1] == "bn2"


def test_batch_norm_fc_adds_bn3_after_fc1_and_label_smoothing_reaches_the_loss():
    names = [n for n, _ in build_cnn(batch_norm_fc=True).named_children()]
    assert names[names.index("fc1") + 1] == "bn3" and "bn1" not in names
    logits, y = (
        torch.tensor([[4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]),
        torch.tensor([0]),
    )
    smooth = Classifier(label_smoothing=0.1).criterion(logits, y)
    plain = Classifier().criterion(logits, y)
    assert smooth > plain and torch.isclose(
        smooth, nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    )
