"""Pretrained weights for ``pretrained:`` (conf/train_model.yaml): a state-dict file or a torchvision name.

``pretrained`` is either a path to a PyTorch state-dict file (``torch.save(model.state_dict(), path)``,
e.g. a torchvision weights file) or a torchvision weights name such as ``ResNet18_Weights.IMAGENET1K_V1``.
Files are read with ``torch.load(weights_only=True)``: tensors and containers only, no code is
unpickled. A name is resolved through torchvision's own download cache (``torch.hub``'s
``<TORCH_HOME>/hub/checkpoints``); kiln itself never needs torchvision (it is asked only for weights
names beyond those of kiln's architectures, :data:`WEIGHTS_URLS`).
With pretrained weights, images are normalised as the weights expect (:data:`IMAGENET_MEAN`,
:data:`IMAGENET_STD`), and the checkpoint stores that normalisation for inference and serving.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

# torchvision's ImageNet weights expect this normalisation (their transforms' mean/std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WEIGHTS_NAME = re.compile(r"^(\w+_Weights)\.(\w+)$")

# torchvision 0.28's ImageNet weights for kiln's architectures (all normalised with ImageNet's mean/std),
# so these names resolve without torchvision.
WEIGHTS_URLS = {
    "ResNet18_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "ResNet34_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "ResNet50_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "ResNet50_Weights.IMAGENET1K_V2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "MobileNet_V3_Small_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
    "MobileNet_V3_Large_Weights.IMAGENET1K_V1": "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
    "MobileNet_V3_Large_Weights.IMAGENET1K_V2": "https://download.pytorch.org/models/mobilenet_v3_large-5c1a4163.pth",
    "EfficientNet_B0_Weights.IMAGENET1K_V1": (
        "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth"
    ),
}


class PretrainedError(ValueError):
    """pretrained: names weights that cannot be used; the message says what to do."""


def is_weights_name(pretrained: str) -> bool:
    """Whether ``pretrained`` reads as a torchvision weights name (``<Model>_Weights.<VERSION>``)."""
    return _WEIGHTS_NAME.match(pretrained) is not None and not Path(pretrained).exists()


def _checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve(pretrained: str | os.PathLike[str]) -> Path:
    """The state-dict file ``pretrained`` names: the path itself, or a weights name's cached file.

    A weights name's file is looked up in torchvision's cache (``torch.hub``'s checkpoints dir) and
    downloaded there if missing, as torchvision's ``weights.get_state_dict()`` does; the names of
    kiln's architectures' weights are known without torchvision, others are looked up in torchvision
    when it imports. Not cached and not downloadable: :class:`PretrainedError` names the file to
    fetch and where to put it.
    """
    text = os.fspath(pretrained)
    if not is_weights_name(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise PretrainedError(
                f"pretrained={text}: no such file; give a state-dict file (torch.save(model.state_dict(), path)) "
                "or a torchvision weights name such as ResNet18_Weights.IMAGENET1K_V1"
            )
        return path
    url = _weights_url(text)
    cached = _checkpoints_dir() / Path(url).name
    if not cached.is_file():
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
        except Exception as error:  # noqa: BLE001 - offline, refused, or a bad download: all say the same
            raise PretrainedError(
                f"pretrained={text}: {cached.name} is not in torchvision's cache and could not be downloaded "
                f"({type(error).__name__}: {error}); download {url} and put it at {cached} "
                f"(or give the file's path: pretrained=/path/to/{cached.name})"
            ) from error
    return cached


def _weights_url(name: str) -> str:
    if name in WEIGHTS_URLS:
        return WEIGHTS_URLS[name]
    enum_name, member = name.split(".", 1)
    try:
        import torchvision.models
    except Exception as error:  # noqa: BLE001 - any import failure means the name cannot be looked up
        raise PretrainedError(
            f"pretrained={name}: not one of the weights kiln knows ({', '.join(WEIGHTS_URLS)}), and torchvision, "
            f"which would know it, does not import here ({error}); download the weights file and give its path"
        ) from error
    weights = getattr(getattr(torchvision.models, enum_name, None), member, None)
    if weights is None:
        raise PretrainedError(f"pretrained={name}: torchvision {torchvision.__version__} has no such weights")
    return str(weights.url)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a ``torch.save`` file (zip or legacy format), read with ``weights_only=True``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for unreadable files
        raise PretrainedError(
            f"pretrained weights '{path}' cannot be read as a state dict: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise PretrainedError(
            f"pretrained weights '{path}' hold a {type(state).__name__}, not a state dict (name -> tensor); "
            "save one with torch.save(model.state_dict(), path)"
        )
    return dict(state)
