"""Errors a user can cause. The CLI turns each into one line and exit code 2.

A message names the Python API's arguments in backquotes (`save_dir`, `overwrite=True`); the CLI
shows its own flag for each (--save-dir, --force).
"""


class HvaeError(Exception):
    """Base class: a problem with the user's input (file, config, sweep), stated in one line."""


class ConfigError(HvaeError):
    """A config or sweep file with an unknown key, a wrong type or an impossible value."""


class DataError(HvaeError):
    """A data file that is missing, unreadable, foreign, empty or holds non-finite values."""


class TrainingDiverged(HvaeError):
    """The loss turned NaN/inf or the KL ran away; the last good checkpoint is kept."""


class FolderInUse(HvaeError):
    """A save folder or experiment that another run holds (its lock names the holder)."""


class ResumeRefused(HvaeError):
    """An experiment whose saved state cannot be shown to be this user's own: resuming it could run code."""


class RayUnavailable(HvaeError):
    """Ray could not be started or reached: a busy host, no free port, an unusable temporary folder, a wrong
    cluster address, or a local instance that would run without authentication."""
