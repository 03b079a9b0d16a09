"""The reference CIFAR-10 ConvNet, its checkpoint keys and a digest of its parameters."""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import torch
from torch import nn

# Wrappers that prefix every key of the module they hold: nn.DataParallel and DDP add "module.",
# torch.compile adds "_orig_mod.". Checkpoints store bare keys so any wrapping can load them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ConvNet(nn.Module):
    """conv 3->32 k3, ReLU, maxpool 2; conv 32->64 k3, ReLU, maxpool 2; fc 2304->128, ReLU; fc 128->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 6 * 6, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def bare_key(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def bare_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every wrapper prefix removed, so a DataParallel checkpoint loads into a plain module."""
    return {bare_key(k): v for k, v in state.items()}


def param_digest(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes, in name order, so ranks compare exactly."""
    digest = hashlib.sha256()
    for name, tensor in sorted(((bare_key(n), t) for n, t in named_parameters), key=lambda item: item[0]):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
