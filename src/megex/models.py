"""Architectures by name: victims and clones (classifiers) and query generators."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLASSIFIERS",
    "GENERATORS",
    "build_classifier",
    "build_generator",
    "ResNet8x",
    "LeNet5",
    "SmallCNN",
    "SoftVote",
    "soft_vote_arch",
    "GeneratorA",
    "fast_layout",
]


def fast_layout(
    module: nn.Module, device: str | torch.device, channels_last: bool | None = None
) -> nn.Module:
    """`module` on `device`, with its convolution weights channels-last on a CPU (or wherever
    `channels_last` is True; False keeps the default layout everywhere).

    On a CPU, oneDNN's channels-last convolutions are faster for these small networks
    (LeNet-5's all-class explanation 2.6x, a clone training step 1.7x, the generator 1.35x:
    benchmarks/cpu_layout.py). The values are the same up to float rounding; state dicts
    keep their shapes. Other devices keep the default layout.
    """
    module = module.to(device)
    if channels_last is None:
        channels_last = torch.device(device).type == "cpu"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


# --- DFME's CIFAR ResNets ("8x": 64 channels in the stem, stages 64/128/256/512) --------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet8x(nn.Module):
    """CIFAR ResNet as in DFME, with global average pooling so any image size works."""

    def __init__(self, blocks: list[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stages.append(self._stage(planes, count, 1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)

    def _stage(self, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (count - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18_8x(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNet8x:
    return ResNet8x([2, 2, 2, 2], num_classes, in_channels)


def resnet34_8x(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNet8x:
    return ResNet8x([3, 4, 6, 3], num_classes, in_channels)


# --- small classifiers for CPU-scale work ---------------------------------------------


class LeNet5(nn.Module):
    """LeNet-5 (6 and 16 5x5 filters, 120-84 fully connected) for any image size >= 8."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"lenet5: image_size must be >= 8, got {image_size}")
        # Pad so that small images (8x8 digits, 28x28 MNIST) keep enough area for both convs.
        pad2 = 2 if image_size < 16 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and one hidden layer: fast on CPU, enough for 8x8 digits."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = 32
    ):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * width * (image_size // 2) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, image_size)


def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    return LeNet5(num_classes, in_channels, image_size)


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_8x": resnet18_8x,
    "resnet34_8x": resnet34_8x,
    "lenet5": lenet5,
    "small_cnn": small_cnn,
}


class SoftVote(nn.Module):
    """Several classifiers as one (an ensemble of clones): the log of their averaged softmax.

    Code that reads logits gets the averaged prediction from it (argmax, softmax), and its
    weights save and load as one module's (`members.0....`), named by :func:`soft_vote_arch`.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 1:
            raise ValueError("soft vote: expected at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # log mean_i softmax_i, as a log-sum-exp of log-softmaxes (exact where one is tiny).
        logp = torch.stack([F.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


_SOFT_VOTE = re.compile(r"soft_vote_(\d+)x_(\w+)")


def soft_vote_arch(member_arch: str, members: int) -> str:
    """The name :func:`build_classifier` builds a soft vote of `members` `member_arch`s by."""
    return f"soft_vote_{members}x_{member_arch}"


def build_classifier(
    name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28
) -> nn.Module:
    """A classifier by name: resnet18_8x, resnet34_8x, lenet5 or small_cnn, or a soft vote of
    several of one of them (`soft_vote_2x_lenet5`, :func:`soft_vote_arch`)."""
    vote = _SOFT_VOTE.fullmatch(name)
    if vote is not None and vote.group(2) in CLASSIFIERS and int(vote.group(1)) >= 1:
        member = vote.group(2)
        return SoftVote(
            [
                build_classifier(member, num_classes, in_channels, image_size)
                for _ in range(int(vote.group(1)))
            ]
        )
    if name not in CLASSIFIERS:
        raise ValueError(
            f"arch: unknown classifier {name!r}; expected one of {', '.join(CLASSIFIERS)}"
        )
    return CLASSIFIERS[name](
        num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )


# --- generators -------------------------------------------------------------------------


class GeneratorA(nn.Module):
    """DFME's generator: latent -> image of any size >= 4 (8x8, 14x14, 28x28, 32x32, 56x56).

    Two nearest-neighbour upsamplings take the first feature map (a quarter of the size,
    rounded up) to the image size. For a multiple of 4 both double, as in DFME; otherwise
    the first goes to half the size rounded up and the second to the size (14: 4, 7, 14).
    `forward` returns images in [0, 1]; `pre_activation` returns the values before tanh,
    where DFME takes its finite differences.
    """

    def __init__(self, image_size: int = 32, channels: int = 3, nz: int = 256, ngf: int = 64):
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
            raise ValueError(
                f"generator: image_size must be a whole number >= 4, got {image_size!r}"
            )
        self.nz, self.image_size, self.channels = nz, image_size, channels
        self.mid_size = math.ceil(image_size / 2)
        self.init_size = math.ceil(self.mid_size / 2)
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.ngf = ngf
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        self.conv1 = nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2 * ngf)
        self.conv2 = nn.Conv2d(2 * ngf, ngf, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(ngf)
        self.conv3 = nn.Conv2d(ngf, channels, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(channels, affine=False)

    def pre_activation(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z).view(z.shape[0], 2 * self.ngf, self.init_size, self.init_size)
        out = self.bn0(out)
        out = _upsample(out, self.mid_size)
        out = F.leaky_relu(self.bn1(self.conv1(out)), 0.2)
        out = _upsample(out, self.image_size)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.2)
        return self.bn3(self.conv3(out))

    @staticmethod
    def to_image(pre: torch.Tensor) -> torch.Tensor:
        """Map pre-activation values to images in [0, 1]."""
        return (torch.tanh(pre) + 1.0) * 0.5

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.pre_activation(z))


def _upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour upsampling of square maps to `size`; an exact doubling is DFME's
    `scale_factor=2` call, so that sizes that are multiples of 4 are made as before."""
    if 2 * x.shape[-1] == size:
        return F.interpolate(x, scale_factor=2)
    return F.interpolate(x, size=(size, size))


GENERATORS: dict[str, Callable[..., nn.Module]] = {"generator_a": GeneratorA}


def build_generator(
    name: str = "generator_a", image_size: int = 32, channels: int = 3, nz: int = 256, ngf: int = 64
) -> GeneratorA:
    """A generator by name (generator_a: DFME's GeneratorA) sized for the victim's images."""
    if name not in GENERATORS:
        raise ValueError(
            f"generator: unknown name {name!r}; expected one of {', '.join(GENERATORS)}"
        )
    return GENERATORS[name](image_size=image_size, channels=channels, nz=nz, ngf=ngf)
