"""What a pipeline run reports to its caller (importable without starting or importing Ray)."""

from encoders.errors import MmembedError


class SourceError(MmembedError):
    """The input is missing, unreadable or lacks a required column."""


class ResourceError(MmembedError):
    """The cluster cannot hold the configured encoder pool beside the tasks that feed it."""
