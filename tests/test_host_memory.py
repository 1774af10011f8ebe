"""glibc keeps the native engine's freed host memory (engine/native/host_memory.py): a freed
96 MB tensor stays in the process's resident set with the setting, and goes back to the kernel
without it (each case in a fresh interpreter: the setting is process-wide and cannot be undone)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import os, sys, torch
from alignserve.engine.native.host_memory import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before = rss()
x = torch.ones(24 << 20)  # 96 MB, every page touched
del x
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc")
@pytest.mark.parametrize("kind", ["kept", "returned"])
def test_freed_memory_stays_only_when_kept(kind):
    grown = int(subprocess.run([sys.executable, "-c", CHILD, kind], capture_output=True,
                               text=True, check=True).stdout.strip())
    if kind == "kept":
        assert grown > 90 << 20  # the tensor's pages are still the process's
    else:
        assert grown < 16 << 20  # unmapped on free (torch's own allocations aside)
