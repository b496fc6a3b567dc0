"""The one exception type that the CLI turns into a single line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user (path, config, data). The message is one line naming the problem."""
