"""What every `python -m meteor_jax.*` entry point sets up the same way: absl logging at INFO for our own
messages, with the libraries' chatter dropped (Orbax logs every checkpoint phase at INFO), and glibc's
huge-page malloc (`run`); and the malloc settings of a process that runs two frameworks (`bench --compare`)."""
from __future__ import annotations

import logging as std_logging
import os
import platform
import sys
import time
from typing import Callable, Mapping

from absl import app, logging

# XLA's CPU runtime allocates an executable's temporaries afresh on every call. Above glibc's mmap threshold
# (32 MiB at most) each allocation is a fresh mapping that the kernel zero-fills one 4 KiB page at a time: the
# shapes recipe's train step took 2.9M page faults a run and 0.235 s a step. With this tunable (glibc >= 2.35)
# malloc asks for 2 MiB transparent huge pages on those mappings: 0.29M faults, 0.140 s a step, same numbers.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_OPT_OUT = "METEOR_JAX_HUGE_PAGES"  # set to 0 to keep the process as started
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

# Two frameworks in one process (`bench --compare torch`): each call of either frees its large buffers, glibc
# returns them to the kernel, and the other's next call faults fresh zeroed pages in. On 2 CPU cores that cost our
# decoder's fwd+bwd 1.4 s a call (2.8 s against 1.4 s alone; 50-61 s of system time a bench run) and transformers'
# 0.4-0.8 s. With one arena, no mmap and no trimming, malloc keeps freed memory for reuse: 22 s of system time,
# and our decoder as fast as alone. Not for the other entry points: on the shapes train step it measured no faster, and
# one arena serialises the allocations of every thread (a data loader's).
RETAINED_MEMORY_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                            "glibc.malloc.trim_threshold=1099511627776")
RETAINED_MEMORY_OPT_OUT = "METEOR_JAX_RETAIN_MEMORY"

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


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None where unknown."""
    try:
        with open(THP_SETTING) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _with_tunables(env: Mapping[str, str], added: str) -> dict:
    """`env` with `added` appended to GLIBC_TUNABLES (colon-separated), keeping what the user set there."""
    tunables = env.get("GLIBC_TUNABLES", "")
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{added}" if tunables else added}


def huge_pages_environment(env: Mapping[str, str], libc: tuple[str, str], thp_mode: str | None) -> dict | None:
    """The environment to restart with so that glibc's malloc uses huge pages, or None when there is nothing to
    do: already set (or set otherwise by the user), opted out, not glibc >= 2.35, or THP off or unknown."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get(HUGE_PAGES_OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb" in tunables:
        return None
    name, version = libc
    try:
        new_enough = name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        new_enough = False
    if not new_enough or thp_mode not in ("always", "madvise"):
        return None
    return _with_tunables(env, HUGE_PAGES_TUNABLE)


def retained_memory_environment(env: Mapping[str, str], libc: tuple[str, str]) -> dict | None:
    """The environment to restart with so that malloc keeps freed memory (`RETAINED_MEMORY_TUNABLES`), or None:
    already set (any of those tunables set by the user counts), opted out, or not glibc."""
    tunables = env.get("GLIBC_TUNABLES", "")
    names = [t.split("=")[0] for t in RETAINED_MEMORY_TUNABLES]
    if env.get(RETAINED_MEMORY_OPT_OUT, "1") == "0" or any(name in tunables for name in names) or libc[0] != "glibc":
        return None
    return _with_tunables(env, ":".join(RETAINED_MEMORY_TUNABLES))


def _restart(env: dict | None, why: str, opt_out: str) -> None:
    """Replace this process by the same command in `env` (None: return). glibc reads tunables only at start-up,
    hence the restart; the PID, open files and arguments stay."""
    if env is None or not sys.platform.startswith("linux"):
        return
    print(f"meteor_jax: restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} ({why}; {opt_out}=0 turns this off)",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, sys.orig_argv, env)


def reexec_with_huge_pages() -> None:
    """Restart with `HUGE_PAGES_TUNABLE` set, where that helps (see `huge_pages_environment`); returns where
    nothing is to be done. Call it first, before JAX or threads start."""
    _restart(huge_pages_environment(os.environ, platform.libc_ver(), _thp_mode()), "huge pages for XLA's CPU buffers",
             HUGE_PAGES_OPT_OUT)


def reexec_with_retained_memory() -> None:
    """Restart with `RETAINED_MEMORY_TUNABLES` set (see `retained_memory_environment`); returns where nothing is
    to be done. Call it before JAX, torch or threads start."""
    _restart(retained_memory_environment(os.environ, platform.libc_ver()),
             "freed memory kept for reuse, for two frameworks in one process", RETAINED_MEMORY_OPT_OUT)


def run(main: Callable) -> None:
    """An entry point's `__main__`: the huge-page restart, then `absl.app.run(main)`."""
    reexec_with_huge_pages()
    app.run(main)
