"""The ``transforms:`` group of conf/train_model.yaml as kiln's C++ image transforms.

Keys are torchvision.transforms.v2's names, with its semantics and defaults (docs/commands/augmentation.md)::

    transforms:
      train:                       # augmentation, in this order; all off by default
        random_resized_crop: null  # {size: [224, 224], scale: [0.08, 1.0], ratio: [0.75, 1.3333]} (or just a size)
        horizontal_flip: 0.0       # probability, RandomHorizontalFlip(p)
        color_jitter: null         # {brightness: 0.4, contrast: 0.4, saturation: 0.4}
        random_erasing: null       # {p: 0.5, scale: [0.02, 0.33], ratio: [0.3, 3.3], value: 0}
      eval:                        # evaluation; batch inference and serving apply the same
        resize: null               # [height, width], or one int: the shorter edge
        center_crop: null          # [height, width] or one int

A size given as one int is square (the shorter edge for ``resize``), as in torchvision. Missing sub-keys take
torchvision's defaults. A value kiln cannot use raises ValueError naming the full key
(``transforms.train.random_resized_crop.scale``); the C++ side checks the ranges the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from kiln import _core

__all__ = ["eval_options", "evaluation_from_config", "from_config", "train_options"]

_GROUPS = ("train", "eval")
_TRAIN_KEYS = ("random_resized_crop", "horizontal_flip", "color_jitter", "random_erasing")
_EVAL_KEYS = ("resize", "center_crop")
_CROP_KEYS = ("size", "scale", "ratio")
_JITTER_KEYS = ("brightness", "contrast", "saturation")
_ERASING_KEYS = ("p", "scale", "ratio", "value")


def from_config(transforms_cfg: Any, channels: int) -> _core.ImageTransform:
    """The training transform: ``transforms.train``'s augmentation (without a random_resized_crop,
    ``transforms.eval``'s resize and center_crop first, so training and evaluation images have one size)."""
    return _core.ImageTransform(train_options(transforms_cfg), eval_options(transforms_cfg), channels)


def evaluation_from_config(transforms_cfg: Any, channels: int) -> _core.ImageTransform:
    """The evaluation transform (``transforms.eval``): what testing, batch inference and serving apply."""
    return _core.ImageTransform.evaluation(eval_options(transforms_cfg), channels)


def train_options(transforms_cfg: Any) -> _core.TrainTransformOptions:
    """``transforms.train`` as options; None (or a missing group) turns every augmentation off."""
    train = _group(transforms_cfg, "train", _TRAIN_KEYS)
    return _core.TrainTransformOptions(
        random_resized_crop=_random_resized_crop(train.get("random_resized_crop")),
        horizontal_flip=_number(
            train.get("horizontal_flip"), "transforms.train.horizontal_flip", 0.0, "a probability in [0, 1]"
        ),
        color_jitter=_color_jitter(train.get("color_jitter")),
        random_erasing=_random_erasing(train.get("random_erasing")),
    )


def eval_options(transforms_cfg: Any) -> _core.EvalTransformOptions:
    """``transforms.eval`` as options; None (or a missing group) leaves evaluation images as stored."""
    evaluation = _group(transforms_cfg, "eval", _EVAL_KEYS)
    resize = evaluation.get("resize")
    center_crop = evaluation.get("center_crop")
    return _core.EvalTransformOptions(
        resize=None if resize is None else _size(resize, "transforms.eval.resize", one_int_is_shorter_edge=True),
        center_crop=None if center_crop is None else _size(center_crop, "transforms.eval.center_crop"),
    )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _mapping(value: Any, key: str, known: Sequence[str]) -> dict[str, Any]:
    value = _plain(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} is {value!r}: expected a mapping with the keys {', '.join(known)} (or null)")
    unknown = [name for name in value if name not in known]
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is not a key kiln knows: {key} takes {', '.join(known)}")
    return dict(value)


def _group(transforms_cfg: Any, name: str, known: Sequence[str]) -> dict[str, Any]:
    groups = _mapping(transforms_cfg, "transforms", _GROUPS)
    return _mapping(groups.get(name), f"transforms.{name}", known)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any, key: str, default: float, expected: str = "a number") -> float:
    if value is None:
        return default
    if not _is_number(value):
        raise ValueError(f"{key} is {value!r}: expected {expected}")
    return float(value)


def _integer(value: Any, key: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} is {value!r}: expected a whole number")
    return value


def _size(value: Any, key: str, *, one_int_is_shorter_edge: bool = False) -> tuple[int, int]:
    value = _plain(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 1:
        value = value[0]
    if _is_number(value):
        size = _integer(value, key)
        # (size, 0) is kiln's "shorter edge" for resize; a zero or negative size is left to the range check.
        return (size, 0) if one_int_is_shorter_edge and size > 0 else (size, size)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return _integer(value[0], key), _integer(value[1], key)
    raise ValueError(f"{key} is {value!r}: expected [height, width] or one int")


def _bounds(value: Any, key: str, default: tuple[float, float]) -> tuple[float, float]:
    value = _plain(value)
    if value is None:
        return default
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(map(_is_number, value)):
        return float(value[0]), float(value[1])
    raise ValueError(f"{key} is {value!r}: expected [min, max]")


def _random_resized_crop(value: Any) -> _core.RandomResizedCropOptions | None:
    key = "transforms.train.random_resized_crop"
    value = _plain(value)
    if value is None:
        return None
    if not isinstance(value, Mapping):  # RandomResizedCrop(224): just the size
        value = {"size": value}
    crop = _mapping(value, key, _CROP_KEYS)
    if crop.get("size") is None:
        raise ValueError(f"{key}.size is missing: give the output [height, width] (or one int)")
    return _core.RandomResizedCropOptions(
        size=_size(crop["size"], f"{key}.size"),
        scale=_bounds(crop.get("scale"), f"{key}.scale", (0.08, 1.0)),
        ratio=_bounds(crop.get("ratio"), f"{key}.ratio", (3.0 / 4.0, 4.0 / 3.0)),
    )


def _color_jitter(value: Any) -> _core.ColorJitterOptions | None:
    key = "transforms.train.color_jitter"
    if _plain(value) is None:
        return None
    jitter = _mapping(value, key, _JITTER_KEYS)
    factors = {}
    for name in _JITTER_KEYS:
        item = jitter.get(name)
        if item is not None and not _is_number(item):
            raise ValueError(
                f"{key}.{name} is {item!r}: expected one number x (the factor is drawn from [max(0, 1 - x), 1 + x])"
            )
        factors[name] = _number(item, f"{key}.{name}", 0.0)
    return _core.ColorJitterOptions(**factors)


def _random_erasing(value: Any) -> _core.RandomErasingOptions | None:
    key = "transforms.train.random_erasing"
    if _plain(value) is None:
        return None
    erasing = _mapping(value, key, _ERASING_KEYS)
    fill = _plain(erasing.get("value", 0))
    fills = fill if isinstance(fill, Sequence) and not isinstance(fill, str) else [fill]
    if not fills or not all(_is_number(item) for item in fills):
        raise ValueError(
            f"{key}.value is {fill!r}: expected a pixel value 0..255 (or one per channel); "
            "erasing runs on uint8 pixels, before normalisation"
        )
    return _core.RandomErasingOptions(
        p=_number(erasing.get("p"), f"{key}.p", 0.5, "a probability in [0, 1]"),
        scale=_bounds(erasing.get("scale"), f"{key}.scale", (0.02, 0.33)),
        ratio=_bounds(erasing.get("ratio"), f"{key}.ratio", (0.3, 3.3)),
        value=[_integer(item, f"{key}.value") for item in fills],
    )
