"""transkd_jax.weights.cli: the parser table and error handling convert and export share."""

import pytest

from transkd_jax.errors import UserError
from transkd_jax.weights import cli


def _positive(text):
  if int(text) < 1:
    raise UserError(f"--n={text}: expected a positive number")
  return int(text)


PARSER = cli.command_line(
  "transkd_jax.example",
  "an example",
  [("--n", dict(type=_positive, required=True)), ("--loud", dict(action="store_true"))],
)


def _command(n, loud):
  if n == 13:
    raise UserError("--n=13: unlucky")
  return f"n={n}{'!' if loud else ''}"


def test_flags_become_the_command_s_parameters(capsys):
  assert PARSER.prog == "python -m transkd_jax.example"
  assert cli.run(PARSER, ["--n=3", "--loud"], _command) == 0
  assert capsys.readouterr().out == "n=3!\n"


@pytest.mark.parametrize("argv,message", [(["--n=13"], "--n=13: unlucky"), (["--n=0"], "--n=0")])
def test_user_errors_are_one_line_and_status_2(capsys, argv, message):
  assert cli.run(PARSER, argv, _command) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith(f"error: {message}")


def test_argparse_errors_stay_argparse_s():
  with pytest.raises(SystemExit):
    cli.run(PARSER, [], _command)
