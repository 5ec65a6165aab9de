"""What the two command lines over this package (``python -m transkd_jax.convert`` and
``python -m transkd_jax.export``) share: the parser from a table of flags, and running a
command that prints one line, or ``error: ...`` with exit status 2 for a UserError."""

import argparse
import sys

from transkd_jax.errors import UserError


def command_line(module: str, description: str, flags, **kwargs) -> argparse.ArgumentParser:
  """``python -m module``'s parser; ``flags``: (flag, add_argument keywords) pairs, in order."""
  parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description, **kwargs)
  for flag, options in flags:
    parser.add_argument(flag, **options)
  return parser


def run(parser: argparse.ArgumentParser, argv, command) -> int:
  """Parses ``argv`` and prints what ``command(**flags)`` returns (its parameters are the
  flags' destinations): 0, or 2 after a UserError (a flag's ``type`` may raise one too)."""
  try:
    line = command(**vars(parser.parse_args(argv)))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(line)
  return 0
