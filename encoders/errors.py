"""Errors raised by encoders; each names what went wrong in its message."""


class EncoderError(ValueError):
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
