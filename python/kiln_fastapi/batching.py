"""Dynamic batching of concurrent requests within one server process.

Every request's images join a queue; one inference thread takes everything queued (up to
``max_images``) and runs it through the C++ predictor in one call, while new requests queue for the
next round. An idle server predicts a lone request at once (no waiting window, and a small one on the
event loop's thread, without the hand-off); a busy one predicts many requests per call, and only one
prediction runs at a time per process, so gunicorn's workers don't fight over the cores with dozens
of concurrent forward passes.

One request's input never changes another's answer: a bad image is a per-image error of its own
request, and should a shared call fail outright (an exception instead of per-image errors), the
requests in it are predicted apart, so only the one whose images raise is answered with that error.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# A lone request of at most this many images (what a server at low load sees) is predicted on the event
# loop's thread: handing it to the inference thread and back cost more than the prediction of a small
# image, and no other request was waiting to join it. Requests arriving meanwhile queue for the next call.
INLINE_IMAGES = 8

# (probabilities [N, classes], per-image error or None), as Predictor.predict_encoded answers.
Answer = tuple[np.ndarray, list[str | None]]


class MicroBatcher:
    def __init__(self, predictor: Any, max_images: int = 64) -> None:
        self._predictor = predictor
        self._max_images = max_images
        self._pending: list[tuple[list[bytes], asyncio.Future]] = []
        self._draining = False
        self._drain_task: asyncio.Task | None = None  # referenced, so the loop cannot drop it mid-run
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-predict")

    async def predict_encoded(self, images: list[bytes]) -> Answer:
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
                requests = [images for images, _ in batch]
                try:
                    if len(batch) == 1 and count <= INLINE_IMAGES:
                        answers = self._predict(requests)
                    else:
                        answers = await loop.run_in_executor(self._executor, self._predict, requests)
                except Exception as error:
                    answers = [error] * len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if future.done():  # the client went away
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(answer)  # handed to the request, which answers for it
                    else:
                        future.set_result(answer)
        finally:
            self._draining = False

    def _predict(self, requests: list[list[bytes]]) -> list[Answer | BaseException]:
        """Each request's answer, from one call for all of them; apart if that call raises."""
        flat = [image for images in requests for image in images]
        try:
            probabilities, errors = self._predictor.predict_encoded(flat)
        except Exception as error:
            if len(requests) == 1:
                return [self._predict_apart(requests[0], error)]
            return [self._predict_alone(images) for images in requests]
        probabilities = probabilities.numpy()
        answers: list[Answer | BaseException] = []
        start = 0
        for images in requests:
            end = start + len(images)
            answers.append((probabilities[start:end], errors[start:end]))
            start = end
        return answers

    def _predict_alone(self, images: list[bytes]) -> Answer | BaseException:
        try:
            probabilities, errors = self._predictor.predict_encoded(images)
        except Exception as error:
            return self._predict_apart(images, error)
        return probabilities.numpy(), list(errors)

    def _predict_apart(self, images: list[bytes], failure: Exception) -> Answer | BaseException:
        """A request whose call raised ``failure``, image by image: the images that raise a ValueError
        (such as a decoder message that is not UTF-8) or a MemoryError become per-image errors, and the
        rest are answered."""
        no_answer = np.zeros(len(self._predictor.classes), dtype=np.float32)
        if len(images) == 1:
            if not isinstance(failure, (ValueError, MemoryError)):
                return failure
            return no_answer[None], [_image_error(failure)]
        rows, errors = [], []
        for image in images:
            try:
                probabilities, image_errors = self._predictor.predict_encoded([image])
            except (ValueError, MemoryError) as error:
                rows.append(no_answer)
                errors.append(_image_error(error))
                continue
            except Exception:
                return failure  # not this request's images: a fault of the server, reported as one
            rows.append(probabilities.numpy()[0])
            errors.append(image_errors[0])
        return np.stack(rows), errors

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _image_error(error: BaseException) -> str:
    return f"the decoder failed on it ({type(error).__name__}: {error})"
