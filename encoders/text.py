"""Text input: validation and batched tokenisation with a checkpoint's tokenizer.json."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import TextValidationError
from .options import MAX_TEXT_BYTES


def check_text(raw: bytes | str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A text row or .txt file's bytes -> the text; empty, undecodable or over `max_bytes` -> TextValidationError."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8")) if isinstance(raw, str) else 0
    if size > max_bytes:
        raise TextValidationError(f"text is {size} bytes, over the {max_bytes} byte limit (a job's limits.text_bytes)")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextValidationError(f"text is not valid UTF-8: {e}") from None
    if not isinstance(raw, str):
        raise TextValidationError(f"text must be a string, not {type(raw).__name__}")
    text = raw.strip()
    if not text:
        raise TextValidationError("text is empty")
    return text


PADDING = ("longest", "max_length")  # to the longest text of the batch, or always to max_length


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer`: truncate to `max_length`, right-pad with `pad_id` to the longest text of the
    batch or, padding="max_length", to `max_length` (SigLIP's text tower was trained on full-length, unmasked input)."""

    def __init__(self, tokenizer_json: str, max_length: int, pad_id: int = 0, padding: str = "longest"):
        if padding not in PADDING:
            raise ValueError(f"padding must be one of {', '.join(PADDING)}, not {padding!r}")
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.pad_id = pad_id
        self.max_length = max_length
        self.padding = padding

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids (batch, seq) int64 and attention_mask (batch, seq) int64."""
        encodings = self.tokenizer.encode_batch(list(texts))
        seq = self.max_length if self.padding == "max_length" else max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), seq), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), seq), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask
