"""The project's errors. `MmembedError` is the one base of everything a user can cause (a bad command, config,
path, model, input or store), raised by every package; the CLI turns exactly that base into one line on stderr,
and anything else keeps its traceback. It lives here because `encoders` is the package every other may import."""

from collections.abc import Iterable


class MmembedError(Exception):
    """Something the user can fix: the message says what, and where."""


class EncoderError(MmembedError):
    """Base for every error an encoder, its store or its preprocessing raises."""


class ModelLoadError(EncoderError):
    """A model could not be found, read or verified."""


class ConversionError(EncoderError):
    """A checkpoint could not be recognised or converted."""


class ImageValidationError(EncoderError):
    """Image bytes could not be decoded, or the image is empty or too large."""


class AudioValidationError(EncoderError):
    """Audio bytes could not be decoded, or hold no usable samples."""


class TextValidationError(EncoderError):
    """Text is empty or not a string."""


def some(names: Iterable[str]) -> str:
    """The first of `names` (sorted) and how many more: "'a.weight' (and 3 more)"."""
    first, *more = sorted(names)
    return f"'{first}'" + (f" (and {len(more)} more)" if more else "")
