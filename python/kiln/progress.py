"""Progress bars for the C++ core's long calls, which report (done, total) from the calling thread."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm


class ProgressBar:
    """A tqdm bar created on the first report, fed by the core's progress callback."""

    def __init__(self, description: str, unit: str, scale: int = 1, postfix: Callable[[], str] | None = None) -> None:
        """``scale``: units per reported step (a batch's images, to show images/s); ``postfix``: a note
        shown after the rate, asked for at each report."""
        self._description = description
        self._unit = unit
        self._scale = scale
        self._postfix = postfix
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                desc=self._description,
                unit=self._unit,
                unit_scale=self._scale if self._scale != 1 else False,
                mininterval=0.5,
            )
        if self._postfix is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
