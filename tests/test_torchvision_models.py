"""kiln's torchvision architectures against torchvision 0.28 itself (imported through the test shim).

Eval-mode numerics must match torchvision's within 1e-4 in fp32. In training mode the parts that draw
random numbers (MobileNetV3's and EfficientNet's dropout, EfficientNet's stochastic depth) take their
masks from kiln's dropout stream, so they are random like torchvision's but not the same draw: the
training-step checks use the architectures (ResNets) and the statistics (batch-norm running stats)
that no random draw touches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional

import kiln
from kiln import _core
from kiln.pretrained import PretrainedError, read_state_dict
from torchvision_shim import import_torchvision

torchvision = import_torchvision()
pytestmark = pytest.mark.skipif(torchvision is None, reason="needs torchvision (pip install -e '.[test]')")

ARCHITECTURES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
]
CLASSES = 7


def torchvision_model(name: str, classes: int = CLASSES) -> torch.nn.Module:
    return getattr(torchvision.models, name)(num_classes=classes)


def randomise_norm_statistics(model: torch.nn.Module) -> None:
    """Batch norms with non-trivial affine parameters and running statistics, so eval numerics check them."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(11)


def test_kiln_lists_the_torchvision_architectures() -> None:
    assert set(ARCHITECTURES) <= set(kiln.model_names())
    assert {"mnist_cnn", "resnet8"} <= set(kiln.model_names())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_torchvision_weights_load_strictly_and_eval_logits_match(name: str) -> None:
    theirs = torchvision_model(name)
    randomise_norm_statistics(theirs)
    ours = _core.Model(name, CLASSES, in_channels=3)
    ours_state = ours.state_dict()
    their_state = theirs.state_dict()
    assert list(ours_state) == list(their_state)
    assert {key: value.shape for key, value in ours_state.items()} == {
        key: value.shape for key, value in their_state.items()
    }
    assert {key: value.dtype for key, value in ours_state.items()} == {
        key: value.dtype for key, value in their_state.items()
    }
    ours.load_state_dict(their_state)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, their_state[key]), key

    theirs.eval()
    ours.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(images)
        actual = ours(images)
    assert actual.shape == (2, CLASSES)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_kiln_weights_load_strictly_into_torchvision(name: str) -> None:
    ours = _core.Model(name, CLASSES, in_channels=3)
    theirs = torchvision_model(name)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    ours.eval()
    # Another size than before, not a multiple of 32: any size the architecture accepts.
    images = torch.randn(3, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-4, atol=1e-4)


def same_weights(name: str) -> tuple[_core.Model, torch.nn.Module]:
    """kiln's `name` and torchvision's, with torchvision's weights and randomised batch-norm statistics in both.

    The weights are drawn from a fixed seed: with some draws a ReLU input sits so close to zero that float
    rounding alone flips it, and gradients then differ by far more than rounding (measured on resnet34: 3.6e-3 of
    the largest gradient between torchvision's own channels-last and contiguous runs, in 2 of 25 draws)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = torchvision_model(name)
    randomise_norm_statistics(theirs)
    ours = _core.Model(name, CLASSES)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def labelled_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four random 64x64 RGB images and their labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    return images, torch.randint(0, CLASSES, (4,), generator=generator)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_one_training_step_from_the_same_weights_matches_torchvision(name: str) -> None:
    ours, theirs = same_weights(name)
    ours.train()
    theirs.train()
    images, labels = labelled_batch(5)

    our_parameters = ours.named_parameters()
    their_parameters = dict(theirs.named_parameters())
    our_optimizer = torch.optim.SGD(our_parameters.values(), lr=0.1, momentum=0.9)
    their_optimizer = torch.optim.SGD(their_parameters.values(), lr=0.1, momentum=0.9)
    our_loss = functional.cross_entropy(ours(images), labels)
    their_loss = functional.cross_entropy(theirs(images), labels)
    our_loss.backward()
    their_loss.backward()
    our_optimizer.step()
    their_optimizer.step()

    # Tolerance: float32 sums over a different kernel order; gradients through ~50 layers.
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-5)
    for key, value in our_parameters.items():
        torch.testing.assert_close(value.grad, their_parameters[key].grad, rtol=1e-3, atol=1e-4, msg=key)
        torch.testing.assert_close(value.detach(), their_parameters[key].detach(), rtol=1e-4, atol=1e-5, msg=key)
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(value, their_state[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet34"])
def test_one_backward_pass_on_channels_last_weights_gives_torchvisions_gradients(name: str) -> None:
    # Training mode draws MobileNetV3's dropout and EfficientNet's stochastic depth from kiln's own stream, so one
    # backward pass is compared in evaluation mode, on channels-last weights and images as kiln trains: there the
    # gradients pass through kiln's own kernels (the depthwise weight gradient; resnet34's Winograd and small-map
    # convolutions) where torchvision's pass through oneDNN's.
    ours, theirs = same_weights(name)
    ours.eval()
    theirs.eval()
    our_parameters = ours.named_parameters()
    for value in our_parameters.values():
        if value.dim() == 4:
            value.data = value.data.contiguous(memory_format=torch.channels_last)
    images, labels = labelled_batch(7)
    images = images.contiguous(memory_format=torch.channels_last)
    functional.cross_entropy(ours(images), labels).backward()
    functional.cross_entropy(theirs(images), labels).backward()
    their_parameters = dict(theirs.named_parameters())
    for key, value in our_parameters.items():
        expected = their_parameters[key].grad
        # Tolerance: float32 sums in another order (and Winograd's transforms) through up to ~50 layers; measured
        # at most 9.4e-7 (mobilenet_v3_small), 2.3e-6 (mobilenet_v3_large), 2.4e-6 (efficientnet_b0) and 8.9e-6
        # (resnet34) of the tensor's largest gradient.
        torch.testing.assert_close(value.grad, expected, rtol=0, atol=1e-4 * expected.abs().max().item(), msg=key)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"])
def test_training_mode_is_random_where_torchvisions_is_and_keeps_the_batch_norm_updates(name: str) -> None:
    theirs = torchvision_model(name)
    ours = _core.Model(name, CLASSES)
    ours.load_state_dict(theirs.state_dict())
    ours.train()
    theirs.train()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        first, second = ours(images), ours(images)
        theirs(images)
        theirs(images)
    assert not torch.equal(first, second)  # dropout draws anew on every pass
    their_state = theirs.state_dict()
    # Stochastic depth (EfficientNet) changes what later batch norms see; MobileNetV3's dropout sits
    # after the last batch norm, so there every running statistic is torchvision's.
    checked = [key for key in their_state if "running" in key]
    if name == "efficientnet_b0":
        checked = [key for key in checked if key.startswith(("features.0.", "features.1."))]
    for key in checked:
        torch.testing.assert_close(ours.state_dict()[key], their_state[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_state_dict_of_another_architecture_is_refused_naming_what_is_wrong() -> None:
    ours = _core.Model("resnet18", CLASSES)
    before = ours.state_dict()["conv1.weight"].clone()
    with pytest.raises(ValueError, match=r"missing 'conv1.weight'.*unexpected 'classifier.0.bias'"):
        ours.load_state_dict(torchvision_model("mobilenet_v3_small").state_dict())
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \[1000, 512\], the model expects \[7, 512\]"):
        ours.load_state_dict(torchvision.models.resnet18().state_dict())
    assert torch.equal(ours.state_dict()["conv1.weight"], before)


def test_pretrained_file_loads_by_path_with_a_new_head_for_another_class_count(tmp_path: Path) -> None:
    source = torchvision.models.resnet18()  # 1000 classes, random weights: made here, offline
    path = tmp_path / "resnet18-random.pth"
    torch.save(source.state_dict(), path)
    ours = _core.Model("resnet18", 5)
    head_before = ours.state_dict()["fc.weight"].clone()
    adaptations = ours.load_pretrained(read_state_dict(path), str(path))
    assert len(adaptations) == 1
    assert "classifier head ('fc.weight', 'fc.bias') is new" in adaptations[0]
    assert "1000 classes, the data 5" in adaptations[0]
    state = ours.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    assert torch.equal(state["fc.weight"], head_before)

    same_classes = _core.Model("resnet18", 1000)
    assert same_classes.load_pretrained(read_state_dict(path)) == []
    assert torch.equal(same_classes.state_dict()["fc.weight"], source.fc.weight.detach())


@pytest.mark.parametrize("channels", [1, 4])
def test_pretrained_rgb_stem_is_adapted_to_the_datas_channels_as_timm_does(tmp_path: Path, channels: int) -> None:
    source = torchvision.models.mobilenet_v3_small(num_classes=5)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    ours = _core.Model("mobilenet_v3_small", 5, in_channels=channels)
    adaptations = ours.load_pretrained(read_state_dict(path))
    assert len(adaptations) == 1
    assert f"'features.0.0.weight' takes {channels} input channel(s)" in adaptations[0]
    rgb = source.features[0][0].weight.detach()
    repeated_and_scaled = torch.cat([rgb, rgb], 1)[:, :channels] * (3 / channels)
    expected = rgb.sum(1, keepdim=True) if channels == 1 else repeated_and_scaled
    torch.testing.assert_close(ours.state_dict()["features.0.0.weight"], expected)
    # A 1-channel image through the summed stem = its grey copy in all three channels through RGB's.
    if channels == 1:
        source.eval()
        ours.eval()
        grey = torch.randn(2, 1, 48, 48)
        with torch.no_grad():
            torch.testing.assert_close(ours(grey), source(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_pretrained_file_of_another_architecture_fails_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(ValueError, match=r"weights '.*mobilenet.pt' does not fit resnet18: missing 'conv1.weight'"):
        _core.Model("resnet18", 5).load_pretrained(read_state_dict(path), f"weights '{path}'")
    torch.save({"model": torchvision.models.resnet18().state_dict()}, path)
    with pytest.raises(PretrainedError, match=r"mobilenet.pt' hold a dict, not a state dict"):
        read_state_dict(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match=r"mobilenet.pt' cannot be read as a state dict"):
        read_state_dict(path)


def test_a_kiln_checkpoint_loads_into_torchvision_and_predicts_the_same(tmp_path: Path, small_raw: Path) -> None:
    processed = tmp_path / "processed"
    kiln.prepare_dataset(small_raw, processed, image_size=(48, 48), channels=3)
    trainer = kiln.Trainer(processed, model="resnet18", lr=0.1, train_batch_size=4, test_batch_size=8)
    trainer.run_epoch()
    checkpoint = tmp_path / "model.pt"
    trainer.save_checkpoint(checkpoint)

    saved = torch.load(checkpoint, weights_only=True)
    theirs = torchvision.models.resnet18(num_classes=len(saved["classes"]))
    theirs.load_state_dict(saved["model"]["state_dict"], strict=True)
    theirs.eval()

    images = kiln.load_split(processed, "test")[0][:6]
    mean = torch.tensor(saved["normalization"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(saved["normalization"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(theirs((images.float() / 255 - mean) / std), 1)
    actual = kiln.Predictor(checkpoint).predict(images)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("optimizer", "options", "torch_optimizer"),
    [
        ("adadelta", {"lr": 1.0}, lambda p: torch.optim.Adadelta(p, lr=1.0)),
        (
            "sgd",
            {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ),
        (
            "adamw",
            {"lr": 1e-3, "weight_decay": 0.05},
            lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
        ),
    ],
)
def test_one_trainer_step_gives_torchvisions_loss_and_weights_with_torch_optim(
    tmp_path: Path, small_raw: Path, optimizer: str, options: dict, torch_optimizer
) -> None:
    processed = tmp_path / "processed"
    # 64 px: at 32 px, layer4's batch norms see 1x1 maps, and their batch statistics over a handful of
    # values amplify rounding differences far beyond what the weights' parity means.
    kiln.prepare_dataset(small_raw, processed, image_size=(64, 64), channels=3)
    images, labels = kiln.load_split(processed, "train")
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    # One batch holding the whole split: one step, whatever the shuffle.
    trainer = kiln.Trainer(
        processed,
        model="resnet18",
        train_batch_size=len(labels),
        precision="fp32",
        # Contiguous layouts, as torchvision's model here: then what is compared is the loop and the
        # optimizer. Channels-last (the default) runs other kernels: the max pool breaks ties (flat
        # regions of upscaled images) at other positions, an equally valid gradient that differs from
        # torch's contiguous one by 1% on conv1 (measured).
        channels_last=False,
        mean=mean,
        std=std,
        optimizer=optimizer,
        **options,
    )
    # torchvision's own initialisation: batch norms at weight 1, bias 0. (With the randomised ones of
    # the eval tests, this random network is so ill-conditioned that torch's gradients alone move by
    # 0.3% when the input changes in its last bit.)
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=len(trainer.classes))
    assert trainer.load_pretrained(theirs.state_dict()) == []
    metrics = trainer.run_epoch()
    checkpoint = tmp_path / "step.pt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)

    theirs.train()
    their_optimizer = torch_optimizer(theirs.parameters())
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    loss = functional.cross_entropy(theirs(x), labels)
    loss.backward()
    their_optimizer.step()

    assert metrics["train_loss"] == pytest.approx(loss.item(), rel=1e-5)
    their_state = theirs.state_dict()
    # Tolerance: float32 kernels (kiln's channels-last, torch's contiguous) sum in another order, so
    # gradients differ in their last bits; where a gradient is ~0, Adadelta's and AdamW's first step
    # (AdamW: lr * g / |g|; Adadelta: lr * sqrt(eps / (1 - rho)) * g / |g|) flips sign with it. So:
    # every weight within two such steps of torchvision's, and all but 0.1% of each tensor's elements
    # within rtol 1e-4, atol 2e-5.
    bound = {"adadelta": 2 * (1e-6 / 0.1) ** 0.5 * options["lr"], "sgd": 0.0, "adamw": 2 * options["lr"]}[optimizer]
    bound += 1e-4
    for key, value in saved["model"]["state_dict"].items():
        expected = their_state[key]
        if not value.is_floating_point():
            assert torch.equal(value, expected), key
            continue
        assert (value - expected).abs().max().item() < bound, key
        close = torch.isclose(value, expected, rtol=1e-4, atol=2e-5)
        assert close.float().mean().item() >= 0.999, (key, (value - expected).abs().max().item())
    # The optimizer state is torch.optim's, and loads there.
    their_optimizer.load_state_dict(saved["optimizer"])
