"""What a pipeline run reports to its caller (importable without starting or importing Ray)."""

from encoders.errors import MmembedError


class SourceError(MmembedError):
    """The input is missing, unreadable or lacks a required column."""


class ResourceError(MmembedError):
    """The cluster cannot hold the configured encoder pool beside the tasks that feed it."""


class ClusterError(MmembedError):
    """The Ray cluster to run on cannot be reached, or refuses this client."""


class EncoderLoadError(MmembedError):
    """An encoder actor (or task) could not load its model: the store fails to load there, or memory runs out."""


class WorkerDiedError(MmembedError):
    """A pipeline's encoder process died (killed: out of memory, a crash) more often than the job restarts it."""
