"""Exceptions that carry a message a user can act on."""


class SynthgradError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, never with a traceback."""

    exit_code = 1


class ConfigError(SynthgradError):
    """A flag, a combination of flags or a run directory that cannot work."""

    exit_code = 2


class DataError(SynthgradError):
    """A dataset that cannot be found, read or trusted."""

    exit_code = 3


class DivergenceError(SynthgradError):
    """A non-finite loss or synthetic gradient: training stopped, last good checkpoint kept.

    what, stage, step: what went non-finite, at which stage (0-based) and step, for callers that
    translate the message (the CLI names its flags).
    """

    exit_code = 4

    def __init__(self, message: str, *, what: str = "", stage: int | None = None, step: int | None = None):
        super().__init__(message)
        self.what, self.stage, self.step = what, stage, step


class StageFailure(SynthgradError):
    """A stage of the pipeline engine raised or died."""

    exit_code = 5


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds: one line per validation rule."""
    if not condition:
        raise ConfigError(message)


class Interrupted(SynthgradError):
    """SIGINT or SIGTERM stopped the run (after its checkpoint, when it stopped at a safe point)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
