"""The one exception type for mistakes a user can fix (bad spec, missing file, existing output).

The CLI prints its message on one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message says what was expected."""
