"""Pretrained weights for ``pretrained:`` (conf/train_model.yaml): a state-dict file or a torchvision name.

``pretrained`` is either a path to a PyTorch state-dict file (``torch.save(model.state_dict(), path)``,
e.g. a torchvision weights file) or a torchvision weights name such as ``ResNet18_Weights.IMAGENET1K_V1``.
Files are read with ``torch.load(weights_only=True)``: tensors and containers only, no code is
unpickled. A name is resolved through torchvision's own download cache (``torch.hub``'s
``<TORCH_HOME>/hub/checkpoints``) when torchvision imports; kiln itself never needs torchvision.
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


class PretrainedError(ValueError):
    """pretrained: names weights that cannot be used; the message says what to do."""


def is_weights_name(pretrained: str) -> bool:
    """Whether ``pretrained`` reads as a torchvision weights name (``<Model>_Weights.<VERSION>``)."""
    return _WEIGHTS_NAME.match(pretrained) is not None and not Path(pretrained).exists()


def _checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve(pretrained: str | os.PathLike[str]) -> Path:
    """The state-dict file ``pretrained`` names: the path itself, or a weights name's cached file.

    A weights name is downloaded into torchvision's cache if torchvision imports and the network
    allows; otherwise :class:`PretrainedError` names the file to fetch and where to put it.
    """
    text = os.fspath(pretrained)
    match = _WEIGHTS_NAME.match(text)
    if match is None or Path(text).exists():
        path = Path(text).expanduser()
        if not path.is_file():
            raise PretrainedError(
                f"pretrained={text}: no such file; give a state-dict file (torch.save(model.state_dict(), path)) "
                "or a torchvision weights name such as ResNet18_Weights.IMAGENET1K_V1"
            )
        return path
    enum_name, member = match.groups()
    try:
        import torchvision.models
    except Exception as error:  # noqa: BLE001 - any import failure means: use the file by path
        raise PretrainedError(
            f"pretrained={text} is a torchvision weights name, but torchvision does not import here ({error}); "
            f"download the weights file and give its path, pretrained=/path/to/file.pth"
        ) from error
    weights_enum = getattr(torchvision.models, enum_name, None)
    weights = getattr(weights_enum, member, None) if weights_enum is not None else None
    if weights is None:
        raise PretrainedError(f"pretrained={text}: torchvision {torchvision.__version__} has no such weights")
    url = weights.url
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
