"""User-facing errors.

Anything raised as `NmmError` is something the user can fix (a bad path, key, shape or file);
the CLI prints its message on one line and exits non-zero instead of showing a traceback.
"""


class NmmError(Exception):
    """An error caused by user input, with a message that names the problem."""


class ConfigError(NmmError):
    """Unknown preset, unknown key, or a value of the wrong type."""


class CheckpointError(NmmError):
    """A checkpoint or run directory that is missing, incomplete or corrupt."""


class InputError(NmmError):
    """A prompt, image or file given to generation/evaluation that cannot be used."""
