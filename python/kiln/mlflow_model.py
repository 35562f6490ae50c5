"""kiln's model in MLflow's pyfunc format (logged as "models from code").

MLflow copies this file into the logged model and runs it on load; the weights come from the kiln
checkpoint artifact, read by the C++ predictor in the precision serving picks with its defaults
(``PRECISION=auto``, ``NO_CUDA=true``; see :mod:`kiln.precision`). Nothing is unpickled.

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    model.predict(images)   # uint8 [N, C, H, W] -> DataFrame: prediction, probability, probabilities

``images`` are processed images as the model was trained on them (the predictor's ``image_shape``, a
processed split's images as they are); the checkpoint's evaluation transform (resize, center crop) is
applied to them before the model, as batch inference and the server apply it.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class KilnImageClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from kiln.precision import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"], no_cuda=True, precision="auto")

    # The hints are MLflow's: np.ndarray is a type hint it accepts without inferring a schema from it
    # (the logged model carries kiln's explicit uint8 [N, C, H, W] TensorSpec signature) and without
    # wrapping predict in its data validation, so inputs reach predict as before.
    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        import torch

        images = np.ascontiguousarray(np.asarray(model_input))
        channels, height, width = self.predictor.image_shape
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (channels, height, width):
            raise ValueError(
                f"expected uint8 images of shape [N, {channels}, {height}, {width}], "
                f"got {images.dtype} {list(images.shape)}"
            )
        probabilities = self.predictor.predict(torch.from_numpy(images)).numpy()
        best = probabilities.argmax(axis=1)
        classes = self.predictor.classes
        return pd.DataFrame(
            {
                "prediction": [classes[i] for i in best],
                "probability": probabilities[np.arange(len(best)), best],
                "probabilities": [row.tolist() for row in probabilities],
            }
        )


mlflow.models.set_model(KilnImageClassifier())
