"""Transparent huge pages for the host buffers of XLA:CPU (glibc's malloc tunable).

XLA:CPU allocates a program's buffers afresh at every call. glibc serves
large allocations with ``mmap`` and returns them with ``munmap``, so every
train step faults each 4 KiB page of its buffers in again: about 570,000
page faults per TransKD-Base step at 512 x 1024 (batch 2), and about 1 s of
kernel time. The glibc tunable ``glibc.malloc.hugetlb=1`` (glibc 2.35 and
later) makes malloc ask the kernel for transparent huge pages
(``madvise``): 2 MiB pages, about 100x fewer faults. On a 2-core CPU machine
the step at 256 x 512 became 12 % faster (docs/performance.md).

glibc reads its tunables once, when the process starts. So the command-line
entry points (``python -m transkd_jax.main``, ``python -m
transkd_jax.benchmark``) call ``reexec`` first: when the tunable is missing,
the process replaces itself (``execve``: same process id, same arguments)
with one whose environment has it. The tunable changes only how memory is
obtained, never a computed value. ``TRANSKD_JAX_HUGE_PAGES=0`` turns this
off; a run started with ``GLIBC_TUNABLES`` already naming
``glibc.malloc.hugetlb`` is left as it is.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
SWITCH = "TRANSKD_JAX_HUGE_PAGES"  # "0": no re-exec


def _glibc_has_tunable() -> bool:
  """Linux with glibc 2.35 or later (where the tunable exists)."""
  if not sys.platform.startswith("linux"):
    return False
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return False
  return tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)


def environment(environ, glibc_ok: bool = None):
  """The environment to re-execute with, or None when this one is already right.

  None when turned off (``TRANSKD_JAX_HUGE_PAGES=0``), when ``GLIBC_TUNABLES``
  already sets ``glibc.malloc.hugetlb`` (any value: the user's choice), or
  when the C library has no such tunable. Otherwise a copy of ``environ`` with
  the setting appended to ``GLIBC_TUNABLES`` (other tunables kept).
  """
  if environ.get(SWITCH, "1") == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(item.split("=")[0] == TUNABLE for item in tunables.split(":")):
    return None
  if not (_glibc_has_tunable() if glibc_ok is None else glibc_ok):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{SETTING}" if tunables else SETTING
  return env


def reexec():
  """Re-executes this process with the huge-page tunable, if it lacks it; else returns.

  Call it first thing in a command-line entry point: whatever the process
  did before is done again by its replacement.
  """
  env = environment(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)


def enabled() -> bool:
  """Whether this process started with the tunable set (for benchmark reports)."""
  return SETTING in os.environ.get("GLIBC_TUNABLES", "").split(":")
