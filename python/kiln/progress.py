"""Progress bars for the C++ core's long calls, which report (done, total) from the calling thread."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm


class ProgressBar:
    """A tqdm bar created on the first report, fed by the core's progress callback."""

    def __init__(
        self,
        description: str,
        unit: str,
        postfix: Callable[[], str] | None = None,
        *,
        batch_size: int = 1,
        units_total: int | None = None,
    ) -> None:
        """``postfix``: a note shown after the rate, asked for at each report. For a core call that reports
        batches (the trainer), ``batch_size`` is the units of a full batch and ``units_total`` the units in
        all: the bar counts units and ends at ``units_total`` although the last batch may be partial."""
        self._description = description
        self._unit = unit
        self._postfix = postfix
        self._batch_size = batch_size
        self._units_total = units_total
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        units_total = self._units_total if self._units_total is not None else total * self._batch_size
        if self._bar is None:
            self._bar = tqdm(total=units_total, desc=self._description, unit=self._unit, mininterval=0.5)
        if self._postfix is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(min(done * self._batch_size, units_total) - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
