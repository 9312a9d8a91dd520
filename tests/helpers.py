"""Helpers shared by tests (importable: pytest puts tests/ on sys.path)."""

from torch import nn


class TinyCNN(nn.Module):
    """A small CNN with a BatchNorm, an in-place ReLU and a reused module."""

    def __init__(self, classes: int = 5, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


def no_hooks(model: nn.Module) -> bool:
    """True when no module of ``model`` holds a forward/backward hook."""
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())
