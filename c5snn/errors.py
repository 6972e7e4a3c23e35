"""The one exception hierarchy of c5snn, and how an exception becomes one line.

Library code raises these; the CLI boundary (`c5snn.cli`) turns any `C5Error` into a one-line
message and exit code 1. Anything else escaping to the boundary is a bug and keeps its traceback.
"""


class C5Error(Exception):
    """Base class: an error the user can act on, with a message that says what to do."""


class DataError(C5Error):
    """The event CSV breaks a rule of DESIGN §1 (format, dates, parts) or is too short."""


class StudyFileError(C5Error):
    """The study file has an unknown key, a missing key or an impossible value."""


class StorageError(C5Error):
    """The database cannot be reached or holds something inconsistent with the request."""


class StudyMismatchError(StorageError):
    """An existing study was created from a different study file."""


class DeviceError(C5Error):
    """The device does not exist or work here, or cannot run what the study file asks."""


class OptionError(C5Error):
    """A command-line option has an impossible value (or two options contradict each other)."""


class EnvironmentFault(C5Error):
    """The worker's machine cannot run any point (device, data file, artifacts disk): the worker
    stops and its point is released for another worker, never charged to the point."""


class TrainingDiverged(C5Error):
    """A run's loss became NaN or infinite: a fault of the trial itself."""


class NotReadyError(C5Error):
    """A step was asked for before the steps it depends on finished (e.g. promote mid-screening)."""


class ArtifactError(C5Error):
    """A file c5snn wrote (a checkpoint, a run directory) cannot be read or would be clobbered."""


class WorkersFailed(C5Error):
    """A local worker process exited non-zero."""


class TrainingInterrupted(C5Error):
    """Training stopped on request (SIGTERM/Ctrl-C); the last finished epoch is checkpointed."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a database driver's own error when it wraps
    one), or its class name when the message is empty: what a one-line report shows."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__
