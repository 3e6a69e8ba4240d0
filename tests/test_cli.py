"""The entry points' shared start-up (meteor_jax/cli.py): the huge-page and retained-memory restarts."""
import os
import platform
import subprocess
import sys

import pytest

from meteor_jax import cli

GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("env, libc, thp, expected", [
    ({}, GLIBC, "madvise", cli.HUGE_PAGES_TUNABLE),
    ({}, GLIBC, "always", cli.HUGE_PAGES_TUNABLE),
    ({}, ("glibc", "2.35"), "madvise", cli.HUGE_PAGES_TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise",
     "glibc.malloc.arena_max=2:" + cli.HUGE_PAGES_TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),  # the user's own choice stays
    ({"GLIBC_TUNABLES": cli.HUGE_PAGES_TUNABLE}, GLIBC, "madvise", None),  # restarted already: no loop
    ({cli.HUGE_PAGES_OPT_OUT: "0"}, GLIBC, "madvise", None),
    ({}, ("glibc", "2.34"), "madvise", None),  # the tunable is newer
    ({}, ("", ""), "madvise", None),  # not glibc (musl, ...)
    ({}, GLIBC, "never", None),
    ({}, GLIBC, None, None),  # no THP setting to read
])
def test_huge_pages_environment(env, libc, thp, expected):
    result = cli.huge_pages_environment({"PATH": "/bin", **env}, libc, thp)
    if expected is None:
        assert result is None
    else:
        assert result == {"PATH": "/bin", **env, "GLIBC_TUNABLES": expected}


RETAINED = ":".join(cli.RETAINED_MEMORY_TUNABLES)


@pytest.mark.parametrize("env, libc, expected", [
    ({}, GLIBC, RETAINED),
    ({"GLIBC_TUNABLES": cli.HUGE_PAGES_TUNABLE}, GLIBC, cli.HUGE_PAGES_TUNABLE + ":" + RETAINED),
    ({"GLIBC_TUNABLES": f"{cli.HUGE_PAGES_TUNABLE}:{RETAINED}"}, GLIBC, None),  # restarted already: no loop
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, GLIBC, None),  # the user's own choice stays
    ({cli.RETAINED_MEMORY_OPT_OUT: "0"}, GLIBC, None),
    ({}, ("", ""), None),  # not glibc
])
def test_retained_memory_environment(env, libc, expected):
    result = cli.retained_memory_environment({"PATH": "/bin", **env}, libc)
    if expected is None:
        assert result is None
    else:
        assert result == {"PATH": "/bin", **env, "GLIBC_TUNABLES": expected}


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or cli.huge_pages_environment({}, platform.libc_ver(), cli._thp_mode()) is None,
    reason="needs Linux with glibc >= 2.35 and transparent huge pages")
def test_reexec_restarts_once_with_the_same_arguments():
    """Both restarts as `bench --compare` makes them (huge pages first, then retained memory): each once."""
    code = ("import os, sys; from meteor_jax import cli; cli.reexec_with_huge_pages(); "
            "cli.reexec_with_retained_memory(); print(os.environ['GLIBC_TUNABLES'], os.getpid(), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", cli.HUGE_PAGES_OPT_OUT, cli.RETAINED_MEMORY_OPT_OUT)}
    proc = subprocess.Popen([sys.executable, "-c", code, "a", "--b=c"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    tunables, pid, args = out.strip().split(" ", 2)
    assert tunables == f"{cli.HUGE_PAGES_TUNABLE}:{RETAINED}"
    assert int(pid) == proc.pid  # exec replaced the process: a launcher still waits on the same one
    assert args == "['a', '--b=c']"
    assert err.count("restarting with GLIBC_TUNABLES") == 2

    opted_out = subprocess.run([sys.executable, "-c", code], env={**env, cli.HUGE_PAGES_OPT_OUT: "0",
                                                                   cli.RETAINED_MEMORY_OPT_OUT: "0",
                                                                   "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},
                               capture_output=True, text=True, timeout=60, check=True)
    assert opted_out.stdout.startswith("glibc.malloc.arena_max=4 ") and "restarting" not in opted_out.stderr
