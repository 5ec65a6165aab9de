"""A config file for the tests' subprocess runs: ``configs/<name>.py`` with the tiny MiT
rows of tests/runs.py for the student and the teacher, so a run through
``python -m transkd_jax.main --config=tests/tiny.py:cityscapes`` compiles in seconds
instead of the half minute or more a B0 step takes. Every other key is the named config's
and ``--config.*`` flags override it as usual."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from runs import REPO, load_config, with_tiny_rows  # noqa: E402


def get_config(name="synthetic"):
  return with_tiny_rows(load_config(REPO / "configs" / f"{name}.py"))
