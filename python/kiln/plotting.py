"""Training plots logged to MLflow: loss/accuracy curves and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; training jobs have no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_training_curves(history: Sequence[dict]) -> Figure:
    """Train/test loss and accuracy per epoch, from kiln.Trainer.history."""
    epochs = [m["epoch"] for m in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        loss_axes.plot(epochs, [m[key] for m in history], marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("test_accuracy", "test")):
        accuracy_axes.plot(epochs, [m[key] for m in history], marker="o", label=label)
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    accuracy_axes.set(title="Accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    return figure


def plot_confusion_matrix(matrix, classes: Sequence[str]) -> Figure:
    """Counts of [true class, predicted class] on the test split."""
    counts = matrix.tolist() if hasattr(matrix, "tolist") else matrix
    size = max(4.0, 0.6 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size), constrained_layout=True)
    image = axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    largest = max((max(row) for row in counts), default=0)
    for row, values in enumerate(counts):
        for column, value in enumerate(values):
            colour = "white" if value > largest / 2 else "black"
            axes.text(column, row, str(value), ha="center", va="center", color=colour, fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure
