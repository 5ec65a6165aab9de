"""The entry points re-execute themselves once with glibc's huge-page tunable."""

import subprocess
import sys

import pytest
from runs import REPO

from transkd_jax import hugepages


def test_environment_adds_the_tunable_and_keeps_the_others():
  assert hugepages.environment({}, glibc_ok=True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  env = hugepages.environment(
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"}, glibc_ok=True
  )
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}


@pytest.mark.parametrize(
  "environ, glibc_ok",
  [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, True),  # the user's own choice stays
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2"}, True),  # done
    ({"TRANSKD_JAX_HUGE_PAGES": "0"}, True),  # turned off
    ({}, False),  # musl, macOS, or glibc before 2.35: no such tunable
  ],
)
def test_no_reexec(environ, glibc_ok):
  assert hugepages.environment(environ, glibc_ok=glibc_ok) is None


@pytest.mark.skipif(not hugepages._glibc_has_tunable(), reason="needs glibc 2.35 or later")
def test_reexec_keeps_the_process_and_its_arguments():
  code = (
    "import os, sys; print('start', os.getpid(), sys.argv[1:], flush=True); "
    "from transkd_jax import hugepages; hugepages.reexec(); "
    "print('running', os.getpid(), os.environ.get('GLIBC_TUNABLES'), hugepages.enabled())"
  )
  env = {"PATH": "/usr/bin:/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
  out = subprocess.run(
    [sys.executable, "-c", code, "--flag=1"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  ).stdout.split("\n")
  pid = out[0].split()[1]
  assert out[:3] == [
    f"start {pid} ['--flag=1']",
    f"start {pid} ['--flag=1']",
    f"running {pid} glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 True",
  ]
