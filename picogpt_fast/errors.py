"""User-facing errors.

Every error a user can cause (a bad model name, a corrupt checkpoint, a prompt that does not fit,
a sampling value out of range) is raised as a `PicoGPTError` whose message is one line naming the
problem and the fix. The CLI prints that line and exits non-zero; it never shows a traceback for them.
"""


class PicoGPTError(Exception):
    """Base class: the message is one line that names the problem and the fix."""


class ConfigError(PicoGPTError, ValueError):
    """A config.json / hparams.json this engine cannot compute."""


class CheckpointError(PicoGPTError):
    """A weights file that is missing, corrupt, or does not match its config."""


class ModelNotFoundError(PicoGPTError):
    """A model name or path that cannot be resolved to a local folder."""


class InvalidArgumentError(PicoGPTError, ValueError):
    """A generation or sampling argument with a value outside its range; `param` names it when it
    is one argument (the server reports it as the error's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidArgumentError):
    """A prompt plus the requested new tokens does not fit the model's context."""


class ConcurrencyError(PicoGPTError, RuntimeError):
    """A session entered from a second thread while in use, or two sessions run at once on a Numba
    threading layer that cannot do that safely (workqueue)."""


class ShuttingDown(PicoGPTError):
    """The server is shutting down: it takes no more requests, and cancels the ones still running
    once its grace period ends."""


class Cancelled(PicoGPTError):
    """A request was cancelled: its client went away."""


def read_json(path, error: type[PicoGPTError], missing: str = ""):
    """Parse a JSON file; a missing, unreadable or malformed file becomes one clear `error`."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path} does not exist{missing}") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path} is not valid JSON ({str(e)[:120]}); re-download the model") from None
