"""Dynamic batching of concurrent requests within one server process.

Every request's images join a queue; one inference thread takes everything queued (up to
``max_images``) and runs it through the C++ predictor in one call, while new requests queue for the
next round. An idle server predicts a lone request at once (no waiting window); a busy one predicts
many requests per call, and only one prediction runs at a time per process, so gunicorn's workers
don't fight over the cores with dozens of concurrent forward passes.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


class MicroBatcher:
    def __init__(self, predictor: Any, max_images: int = 64) -> None:
        self._predictor = predictor
        self._max_images = max_images
        self._pending: list[tuple[list[bytes], asyncio.Future]] = []
        self._draining = False
        self._drain_task: asyncio.Task | None = None  # referenced, so the loop cannot drop it mid-run
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-predict")

    async def predict_encoded(self, images: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """(probabilities [N, classes], per-image error or None), as Predictor.predict_encoded."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((images, future))
        if not self._draining:
            self._draining = True
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, count = [], 0
                while self._pending and (not batch or count + len(self._pending[0][0]) <= self._max_images):
                    images, future = self._pending.pop(0)
                    batch.append((images, future))
                    count += len(images)
                flat = [image for images, _ in batch for image in images]
                try:
                    probabilities, errors = await loop.run_in_executor(
                        self._executor, self._predictor.predict_encoded, flat
                    )
                except Exception as error:  # handed to the requests, which answer for it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                probabilities = probabilities.numpy()
                start = 0
                for images, future in batch:
                    end = start + len(images)
                    if not future.done():  # the client may have gone away
                        future.set_result((probabilities[start:end], errors[start:end]))
                    start = end
        finally:
            self._draining = False

    def close(self) -> None:
        self._executor.shutdown(wait=True)
