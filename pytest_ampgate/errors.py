"""Errors a user can act on.

Every error raised for bad input derives from :class:`AmpGateError`, so the plugin can turn it into
a one-line message that names the culprit and the fix instead of a traceback into our internals.
"""


class AmpGateError(Exception):
    """Base class: the message names the file, key or argument at fault and how to fix it."""


class ConfigError(AmpGateError, ValueError):
    """An option, ini value or marker argument is unknown, of the wrong type, or out of range."""


class ModeError(ConfigError):
    """A precision-mode name is unknown or refused (for example Apex's O2)."""


class DataError(AmpGateError):
    """A data root is missing or holds files that cannot be read as the dataset they claim to be."""


class WorkloadError(AmpGateError):
    """A user workload's model, data, loss and optimizer do not fit together."""


class BaselineError(AmpGateError):
    """A baseline file is unreadable, of an unknown schema, or would be written outside its directory."""
