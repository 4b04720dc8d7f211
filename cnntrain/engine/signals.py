"""Ctrl-C and SIGTERM as a flag that the loops check between steps, so a stop always leaves a checkpoint."""

from __future__ import annotations

import os
import signal
from typing import Any


class StopRequested:
    """Set by SIGINT/SIGTERM; every loop checks it between steps. A second SIGINT exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked worker inherited the handler: the main process decides
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a launcher's worker): leave signals alone
                return

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)
