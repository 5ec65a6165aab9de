"""The one exception type for mistakes a user can fix (paths, keys, values).

Entry points catch it and print its message without a traceback; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input; the message says what and what was expected."""
