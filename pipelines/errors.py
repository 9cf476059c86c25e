"""What a pipeline run reports to its caller (importable without starting or importing Ray)."""


class SourceError(ValueError):
    """The input is missing, unreadable or lacks a required column."""


class ResourceError(ValueError):
    """The cluster cannot hold the configured encoder pool beside the tasks that feed it."""
