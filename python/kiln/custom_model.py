"""Models users bring from Python: ``model=python:<module>:<callable>``.

The callable is called as ``callable(num_classes, in_channels)`` and returns a ``torch.nn.Module``
mapping normalised images ``[N, C, H, W]`` to logits ``[N, num_classes]``. kiln compiles it with
``torch.jit.script`` and hands the TorchScript archive to its C++ trainer, which trains it with the
same loop, checkpoints, resume and MLflow logging as kiln's own models. The checkpoint holds the
archive, so batch inference and serving rebuild the model from the checkpoint alone, without
importing the module. A TorchScript archive is code (in TorchScript's language, not pickled
Python): use checkpoints of ``python:`` models from trusted sources only.

The module is found as Hydra apps find imports: on ``sys.path`` plus the current directory.
"""

from __future__ import annotations

import importlib
import io
import os
import sys
import warnings
from typing import Any

PREFIX = "python:"


class ModelConversionError(ValueError):
    """The model= callable could not be found, called or compiled to TorchScript."""


def is_custom(name: str) -> bool:
    """Whether ``name`` is a ``python:<module>:<callable>`` model."""
    return name.startswith(PREFIX)


def _resolve(name: str) -> Any:
    parts = name[len(PREFIX) :].split(":")
    if len(parts) != 2 or not all(parts):
        raise ModelConversionError(
            f"model '{name}': expected python:<module>:<callable>, e.g. python:my_project.models:build"
        )
    module_name, attribute = parts
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelConversionError(
            f"model '{name}': cannot import module '{module_name}' (searched sys.path and {cwd}): {error}"
        ) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelConversionError(f"model '{name}': module '{module_name}' has no '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise ModelConversionError(f"model '{name}': '{module_name}:{attribute}' is not callable")
    return target


def build_module(name: str, num_classes: int, in_channels: int, seed: int) -> Any:
    """The ``torch.nn.Module`` model ``name``'s callable builds for ``num_classes`` classes and
    ``in_channels`` channels, its weights initialised from ``seed`` (torch's global generator is left as
    it was). Raises ModelConversionError naming the model when it is not found or not a module."""
    import torch

    build = _resolve(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build(num_classes, in_channels)
    if not isinstance(module, torch.nn.Module):
        raise ModelConversionError(f"model '{name}' returned {type(module).__name__}, not a torch.nn.Module")
    return module


def script(name: str, num_classes: int, in_channels: int, seed: int) -> bytes:
    """Build model ``name`` (build_module) and return its TorchScript archive (``torch.jit.save``'s bytes).

    Raises ModelConversionError (a ValueError) naming the model, with TorchScript's message when the
    module does not compile.
    """
    import torch

    module = build_module(name, num_classes, in_channels, seed)
    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit.script and torch.jit.save deprecated in favour of torch.compile and
        # torch.export, neither of which gives LibTorch's C++ loop a module it can train; not the user's to act on.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        try:
            scripted = torch.jit.script(module)
        except Exception as error:  # TorchScript raises NotSupportedError, RuntimeError and others
            raise ModelConversionError(
                f"model '{name}' ({type(module).__name__}) cannot be compiled to TorchScript, which kiln's C++ "
                f"trainer runs; see docs/commands/models.md, 'Bring your own model'. torch.jit.script said: "
                f"{type(error).__name__}: {error}"
            ) from error
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def register(name: str, data_dir: os.PathLike[str] | str, seed: int) -> None:
    """Script model ``name`` for the dataset in ``data_dir`` (its classes and channels) and make it
    the model ``kiln.Trainer(model=name)`` builds in this process."""
    import kiln
    from kiln._core import register_scripted_model

    manifest = kiln.read_manifest(data_dir)
    archive = script(name, len(manifest.classes), manifest.image.channels, seed)
    register_scripted_model(name, archive)
