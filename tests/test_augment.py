"""kiln's augmentation and evaluation transforms against torchvision.transforms.v2 (imported through the test shim).

Crops, flips, center crops (with v2's padding) and erasing are pixel copies: exact. Resizing is exact too:
kiln runs the ATen op torchvision runs on uint8 CPU tensors (``_upsample_bilinear2d_aa``). Brightness,
contrast and saturation redo torchvision's float32 arithmetic per pixel, exact where ATen's vectorised kernels
fuse multiply-adds (AVX2 and AVX-512 CPUs); on a CPU without AVX2 torchvision resizes through float32 and its
kernels round twice, so there the tests allow a difference of 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from kiln import _core
from kiln import transforms as kiln_transforms
from kiln._core import transforms as K
from torchvision_shim import import_torchvision

torchvision = import_torchvision()
pytestmark = pytest.mark.skipif(torchvision is None, reason="needs torchvision (pip install -e '.[test]')")
if torchvision is not None:
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
TOLERANCE = 0 if EXACT else 1
SHAPES = [(1, 17, 23), (3, 17, 23), (3, 64, 48), (1, 100, 75), (3, 224, 224), (3, 300, 257)]


def random_image(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=generator)


def assert_pixels(kiln_image: torch.Tensor, torchvision_image: torch.Tensor, tolerance: int = 0) -> None:
    assert kiln_image.dtype == torch.uint8
    assert kiln_image.shape == torchvision_image.shape
    difference = (kiln_image.int() - torchvision_image.int()).abs().max().item()
    assert difference <= tolerance, f"pixels differ by up to {difference}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_crops_flips_and_erasing_equal_torchvision_exactly(shape: tuple[int, int, int]) -> None:
    channels, height, width = shape
    image = random_image(*shape)
    assert torch.equal(K.horizontal_flip(image), F.horizontal_flip(image))
    for box in [(0, 0, height, width), (1, 2, height // 2, width // 3), (height // 3, width // 4, 5, 7)]:
        assert torch.equal(K.crop(image, *box), F.crop(image, *box))
    # Boxes reaching past the image: torchvision pads with 0.
    assert torch.equal(K.crop(image, -3, width - 4, height, 9), F.crop(image, -3, width - 4, height, 9))
    for size in [(8, 8), (height - 1, width - 2), (height, width), (height + 3, width + 6), (height + 1, 4)]:
        assert torch.equal(K.center_crop(image, size), F.center_crop(image, list(size)))
    value = [7, 100, 250][:channels]
    erased = F.erase(image, 2, 3, height // 2, width - 3, torch.tensor(value, dtype=torch.float32)[:, None, None])
    assert torch.equal(K.erase(image, 2, 3, height // 2, width - 3, value), erased)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_resize_and_resized_crop_equal_torchvision(shape: tuple[int, int, int]) -> None:
    _, height, width = shape
    image = random_image(*shape, seed=1)
    for size in [(8, 8), (height // 2 + 1, width // 3 + 1), (2 * height, width + 7), (height, width), (224, 224)]:
        assert_pixels(K.resize(image, size), F.resize(image, list(size), antialias=True), TOLERANCE)
    for box in [(0, 0, height, width), (1, 2, height // 2 + 1, width // 2 + 1), (height // 3, 0, height // 2, width)]:
        expected = F.resized_crop(image, *box, [32, 40], antialias=True)
        assert_pixels(K.resized_crop(image, *box, (32, 40)), expected, TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_brightness_contrast_and_saturation_equal_torchvision(shape: tuple[int, int, int]) -> None:
    image = random_image(*shape, seed=2)
    factors = [0.0, 0.25, 0.6, 1.0, 1.37, 2.0] + torch.rand(4, generator=torch.Generator().manual_seed(3)).tolist()
    for factor in factors:
        assert_pixels(K.adjust_brightness(image, factor), F.adjust_brightness(image, factor), TOLERANCE)
        assert_pixels(K.adjust_contrast(image, factor), F.adjust_contrast(image, factor), TOLERANCE)
        assert_pixels(K.adjust_saturation(image, factor), F.adjust_saturation(image, factor), TOLERANCE)


def torchvision_redo(image: torch.Tensor, transform: _core.ImageTransform, drawn: _core.TransformDraw) -> torch.Tensor:
    """What torchvision.transforms.v2.functional makes of `image` with the parameters kiln drew."""
    train = transform.train_options
    evaluation = transform.eval_options
    out = image
    if drawn.resized_crop is not None:
        box = drawn.resized_crop
        size = list(train.random_resized_crop.size)
        out = F.resized_crop(out, box.top, box.left, box.height, box.width, size, antialias=True)
    else:
        if evaluation.resize is not None:
            height, width = evaluation.resize
            out = F.resize(out, [height] if width == 0 else [height, width], antialias=True)
        if evaluation.center_crop is not None:
            out = F.center_crop(out, list(evaluation.center_crop))
    if drawn.horizontal_flip:
        out = F.horizontal_flip(out)
    for adjustment, factor in drawn.color:
        out = getattr(F, f"adjust_{adjustment}")(out, factor)
    if drawn.erase is not None:
        box = drawn.erase
        value = torch.tensor(train.random_erasing.value, dtype=torch.float32)[:, None, None]
        out = F.erase(out, box.top, box.left, box.height, box.width, value)
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_training_transform_equals_torchvision_with_the_parameters_it_drew(channels: int) -> None:
    config = {
        "train": {
            "random_resized_crop": {"size": [56, 48], "scale": [0.2, 1.0]},
            "horizontal_flip": 0.5,
            "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
            "random_erasing": {"p": 0.5, "value": 128},
        }
    }
    transform = kiln_transforms.from_config(config, channels)
    image = random_image(channels, 90, 120, seed=4)
    flips = erasures = 0
    for position in range(40):
        drawn = transform.draw(90, 120, seed=5, epoch=2, position=position)
        kiln_image = transform.apply(image, seed=5, epoch=2, position=position)
        # Without AVX2 each of the 4 steps may add 1, which the next factors (< 1.4) scale: 1.4^3 + 1.4^2 + 1.4 + 1.
        assert_pixels(kiln_image, torchvision_redo(image, transform, drawn), 0 if EXACT else 7)
        assert sorted(name for name, _ in drawn.color) == ["brightness", "contrast", "saturation"]
        assert all(0.6 <= factor < 1.4 for _, factor in drawn.color)
        flips += drawn.horizontal_flip
        erasures += drawn.erase is not None
    assert 5 < flips < 35 and 5 < erasures < 35


def test_training_without_a_crop_resizes_and_crops_as_evaluation_does() -> None:
    config = {"train": {"horizontal_flip": 1.0}, "eval": {"resize": 40, "center_crop": [32, 30]}}
    image = random_image(3, 75, 100, seed=6)
    train = kiln_transforms.from_config(config, 3)
    evaluation = kiln_transforms.evaluation_from_config(config, 3)
    assert train.output_size(75, 100) == evaluation.output_size(75, 100) == (32, 30)
    assert torch.equal(train.apply(image, seed=1), F.horizontal_flip(evaluation.apply(image)))


@pytest.mark.parametrize("shape", [(3, 75, 100), (1, 100, 75), (3, 33, 33), (3, 20, 24)])
def test_evaluation_transform_equals_torchvision_resize_then_center_crop(shape: tuple[int, int, int]) -> None:
    image = random_image(*shape, seed=7)
    for resize, crop in [(40, 32), (40, None), ([24, 50], [20, 20]), (None, 30), (None, [48, 48])]:
        evaluation = kiln_transforms.evaluation_from_config({"eval": {"resize": resize, "center_crop": crop}}, shape[0])
        steps = ([v2.Resize(resize)] if resize is not None else []) + ([v2.CenterCrop(crop)] if crop else [])
        expected = v2.Compose(steps)(image)
        assert evaluation.output_size(*shape[1:]) == tuple(expected.shape[1:])
        assert_pixels(evaluation.apply(image), expected, TOLERANCE)
        assert not evaluation.random()


def test_apply_is_deterministic_per_seed_epoch_and_position() -> None:
    transform = kiln_transforms.from_config(
        {"train": {"random_resized_crop": 32, "horizontal_flip": 0.5, "color_jitter": {"brightness": 0.5}}}, 3
    )
    image = random_image(3, 64, 64, seed=8)
    first = transform.apply(image, seed=3, epoch=1, position=10)
    assert torch.equal(first, transform.apply(image, seed=3, epoch=1, position=10))
    for other in [
        dict(seed=4, epoch=1, position=10),
        dict(seed=3, epoch=2, position=10),
        dict(seed=3, epoch=1, position=11),
    ]:
        assert not torch.equal(first, transform.apply(image, **other))


def fits(box: _core.CropBox, height: int, width: int) -> bool:
    return box.top >= 0 and box.left >= 0 and box.top + box.height <= height and box.left + box.width <= width


@pytest.mark.parametrize("size", [(224, 224), (300, 200), (64, 512), (10, 10), (3, 90)])
def test_random_resized_crop_params_satisfy_torchvision_constraints(size: tuple[int, int]) -> None:
    """Each box is inside the image and either torchvision's central fallback or a box whose area fraction and
    aspect ratio are within scale and ratio up to the rounding of its sides (w = round(sqrt(area * ratio)), h =
    round(sqrt(area / ratio))); and the boxes are distributed as torchvision draws them."""
    height, width = size
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    options = _core.RandomResizedCropOptions(size=(8, 8), scale=scale, ratio=ratio)
    fallback_width, fallback_height = width, height
    if width / height < ratio[0]:
        fallback_height = round(width / ratio[0])
    elif width / height > ratio[1]:
        fallback_width = round(height * ratio[1])
    fallback = ((height - fallback_height) // 2, (width - fallback_width) // 2, fallback_height, fallback_width)
    area = height * width
    kiln_fractions = []
    for position in range(1000):
        box = _core.random_resized_crop_params(height, width, options, _core.SampleRandom(11, 0, position))
        assert fits(box, height, width) and box.height >= 1 and box.width >= 1
        h, w = box.height, box.width
        kiln_fractions.append(h * w / area)
        if (box.top, box.left, h, w) == fallback:
            continue
        assert (w - 0.5) * (h - 0.5) <= scale[1] * area and (w + 0.5) * (h + 0.5) >= scale[0] * area
        assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
    crop = v2.RandomResizedCrop(8, scale=scale, ratio=ratio)
    torch.manual_seed(0)
    torchvision_fractions = []
    for _ in range(1000):
        params = crop.make_params([torch.empty(1, height, width, dtype=torch.uint8)])
        torchvision_fractions.append(params["height"] * params["width"] / area)
    spread = torch.tensor(torchvision_fractions).std().item() + 1e-3
    mean_difference = abs(sum(kiln_fractions) - sum(torchvision_fractions)) / 1000
    assert mean_difference < 5 * spread / math.sqrt(1000) + 0.01


def test_random_erasing_boxes_lie_inside_the_image() -> None:
    options = _core.RandomErasingOptions(p=1.0, scale=(0.02, 0.5), ratio=(0.3, 3.3), value=[0])
    found = 0
    for position in range(500):
        box = _core.random_erasing_params(20, 30, options, _core.SampleRandom(2, 0, position))
        if box is None:
            continue
        found += 1
        assert fits(box, 20, 30) and box.height < 20 and box.width < 30
    assert found > 450


def test_from_config_reads_the_yaml_group_with_torchvision_defaults() -> None:
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {
            "train": {
                "random_resized_crop": {"size": 224},
                "horizontal_flip": 0.5,
                "color_jitter": {"brightness": 0.4, "saturation": 0.2},
                "random_erasing": {"p": 0.25, "value": [1, 2, 3]},
            },
            "eval": {"resize": 256, "center_crop": 224},
        }
    )
    transform = kiln_transforms.from_config(config, 3)
    train = transform.train_options
    assert train.random_resized_crop.size == (224, 224)
    assert train.random_resized_crop.scale == (0.08, 1.0)
    assert train.random_resized_crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert train.horizontal_flip == 0.5
    assert (train.color_jitter.brightness, train.color_jitter.contrast, train.color_jitter.saturation) == (0.4, 0, 0.2)
    erasing = train.random_erasing
    assert (erasing.p, erasing.scale, erasing.ratio, erasing.value) == (0.25, (0.02, 0.33), (0.3, 3.3), [1, 2, 3])
    assert transform.eval_options == _core.EvalTransformOptions(resize=(256, 0), center_crop=(224, 224))
    assert transform.output_size(480, 640) == (224, 224) and transform.random()
    off = kiln_transforms.from_config({"train": {"random_resized_crop": None, "horizontal_flip": 0.0}, "eval": {}}, 1)
    assert off.identity() and not off.random()
    assert kiln_transforms.evaluation_from_config(None, 3).identity()


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (
            {"train": {"random_resized_crop": {"size": 224, "scale": [0.9, 0.1]}}},
            "transforms.train.random_resized_crop.scale",
        ),
        ({"train": {"random_resized_crop": {"scale": [0.5, 1.0]}}}, "transforms.train.random_resized_crop.size"),
        ({"train": {"random_resized_crop": {"size": [0, 224]}}}, "transforms.train.random_resized_crop.size"),
        (
            {"train": {"random_resized_crop": {"size": 32, "ratio": "wide"}}},
            "transforms.train.random_resized_crop.ratio",
        ),
        ({"train": {"horizontal_flip": 1.5}}, "transforms.train.horizontal_flip"),
        ({"train": {"horizontal_flip": True}}, "transforms.train.horizontal_flip"),
        ({"train": {"color_jitter": {"hue": 0.1}}}, "transforms.train.color_jitter.hue"),
        ({"train": {"color_jitter": {"contrast": [0.5, 1.5]}}}, "transforms.train.color_jitter.contrast"),
        ({"train": {"random_erasing": {"p": 2}}}, "transforms.train.random_erasing.p"),
        ({"train": {"random_erasing": {"value": "random"}}}, "transforms.train.random_erasing.value"),
        ({"train": {"random_erasing": {"value": [1, 2]}}}, "transforms.train.random_erasing.value"),
        ({"train": {"random_erasing": {"value": 300}}}, "transforms.train.random_erasing.value"),
        ({"eval": {"resize": "big"}}, "transforms.eval.resize"),
        ({"eval": {"center_crop": [10, -1]}}, "transforms.eval.center_crop"),
        ({"eval": {"random_crop": 3}}, "transforms.eval.random_crop"),
        ({"test": {}}, "transforms.test"),
    ],
)
def test_a_bad_value_raises_valueerror_naming_the_full_key(config: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key} "):
        kiln_transforms.from_config(config, 3)


def test_functional_forms_refuse_images_they_cannot_take() -> None:
    with pytest.raises(ValueError, match=r"expected a uint8 \[C, H, W\] image"):
        K.resize(torch.zeros(3, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        K.adjust_contrast(torch.zeros(4, 4, 4, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError, match="channels"):
        kiln_transforms.evaluation_from_config(None, 3).apply(torch.zeros(1, 4, 4, dtype=torch.uint8))
