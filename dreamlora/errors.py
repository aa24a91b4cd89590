"""The two kinds of bad input a user can give, each with a message that names the flag or file.

Every package raises these and the command-line entry points turn them into one clear line and an exit code,
so they live at the bottom, where every package may import them.
"""


class ArgError(ValueError):
    """A bad flag value or combination; the message names the flag."""


class DataError(ValueError):
    """Bad training data; the message names the flag or file."""
