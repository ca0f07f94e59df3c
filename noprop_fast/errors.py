"""Errors a user can cause.

A `UserError` is a mistake in what the user asked for (a bad config key, a missing data folder, a
corrupt file). The CLI prints its message as one line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(UserError):
    """An unknown config key, a bad value, or a config file that cannot be read."""


class DataError(UserError):
    """A missing data folder or file, or a file whose header or size does not match its format."""
