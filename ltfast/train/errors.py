"""The trainer's two named failures. Both are caught by the command-line tools and printed as one
line (the key or the file and what was expected) instead of a traceback."""


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the offending key."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; the message names the file."""
