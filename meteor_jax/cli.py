"""What every `python -m meteor_jax.*` entry point sets up the same way: absl logging at INFO for our own
messages, with the libraries' chatter dropped (Orbax logs every checkpoint phase at INFO)."""
from __future__ import annotations

import logging as std_logging
import time
from typing import Callable

from absl import logging

# Libraries whose INFO records are noise on a console; their warnings and errors still show.
QUIET_LIBRARIES = ("/orbax/",)


def _not_library_info(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(lib in record.pathname for lib in QUIET_LIBRARIES)


def setup_logging(level: int = logging.INFO) -> None:
    logging.set_verbosity(level)
    handler = logging.get_absl_handler()
    if _not_library_info not in handler.filters:
        handler.addFilter(_not_library_info)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` (which blocks until its work is done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times
