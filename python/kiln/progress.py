"""Progress bars for the C++ core's long calls, which report (done, total) from the calling thread."""

from __future__ import annotations

from tqdm import tqdm


class ProgressBar:
    """A tqdm bar created on the first report, fed by the core's progress callback."""

    def __init__(self, description: str, unit: str) -> None:
        self._description = description
        self._unit = unit
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self._description, unit=self._unit, mininterval=0.5)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
