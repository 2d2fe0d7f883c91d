"""The errors that describe bad input rather than a bug. Their messages name the config key,
file, video, frame or store member and what to do; the CLI prints them without a traceback.
Kept free of heavy imports so that the CLI can catch them without loading torch."""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DataError", "StoreError"]


class UserError(ValueError):
    """Bad input: the message says what is wrong and where."""


class ConfigError(UserError):
    """A config value is missing, unknown, of the wrong type or out of range."""


class DataError(UserError):
    """A problem with the dataset on disk; the message names the file, video or frame."""


class StoreError(UserError):
    """A store that is missing a member, a split or frames, or disagrees between members."""
