"""SentencePiece model files (`spiece.model`), read without the sentencepiece package.

A `.model` file is one serialised `ModelProto` (sentencepiece_model.proto, proto2): its pieces with their scores and
types, a TrainerSpec (the model type, the unknown piece, byte fallback) and a NormalizerSpec (the precompiled
character map and the whitespace rules). This reads the few fields a tokenizer needs straight off the protobuf wire
format, so converting a checkpoint needs neither sentencepiece nor protobuf. Absent fields take the .proto defaults.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError

# ModelProto field numbers, from sentencepiece_model.proto
PIECES, TRAINER_SPEC, NORMALIZER_SPEC = 1, 2, 3
PIECE, SCORE, TYPE = 1, 2, 3  # SentencePiece
MODEL_TYPE, SPLIT_BY_WHITESPACE, TREAT_WHITESPACE_AS_SUFFIX, BYTE_FALLBACK, UNK_ID = 3, 22, 24, 35, 40  # TrainerSpec
CHARSMAP, ADD_DUMMY_PREFIX, REMOVE_EXTRA_WHITESPACES, ESCAPE_WHITESPACES = 2, 3, 4, 5  # NormalizerSpec
UNIGRAM = 1  # TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type


@dataclass(frozen=True)
class SentencePieceModel:
    pieces: tuple[tuple[str, float, int], ...]  # (piece, score, type), by id
    model_type: int = UNIGRAM
    unk_id: int = 0
    byte_fallback: bool = False
    split_by_whitespace: bool = True  # no piece holds a "▁" but at its start
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    def piece_id(self, piece: str) -> int | None:
        return next((i for i, (p, _, _) in enumerate(self.pieces) if p == piece), None)


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """One message's (field number, value) pairs: varints as ints, length-delimited fields as bytes, fixed32 and
    fixed64 as their raw bytes."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(data):
            raise ValueError("truncated message")
        out.append((number, value))
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def read(path: Path) -> SentencePieceModel:
    """A SentencePiece `.model` file -> its pieces and the settings that shape tokenisation."""
    try:
        top = _fields(Path(path).read_bytes())
        pieces = []
        for number, value in top:
            if number == PIECES:
                piece = dict(_fields(value))
                score = struct.unpack("<f", piece[SCORE])[0] if SCORE in piece else 0.0
                pieces.append((piece.get(PIECE, b"").decode(), score, piece.get(TYPE, NORMAL)))
        trainer = dict(_fields(next((v for n, v in top if n == TRAINER_SPEC), b"")))
        normalizer = dict(_fields(next((v for n, v in top if n == NORMALIZER_SPEC), b"")))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ConversionError(f"cannot read SentencePiece model {path}: {e}") from None
    if not pieces:
        raise ConversionError(f"{path} holds no SentencePiece pieces")
    return SentencePieceModel(
        pieces=tuple(pieces),
        model_type=trainer.get(MODEL_TYPE, UNIGRAM),
        unk_id=trainer.get(UNK_ID, 0),
        byte_fallback=bool(trainer.get(BYTE_FALLBACK, False)),
        split_by_whitespace=bool(trainer.get(SPLIT_BY_WHITESPACE, True)),
        treat_whitespace_as_suffix=bool(trainer.get(TREAT_WHITESPACE_AS_SUFFIX, False)),
        precompiled_charsmap=normalizer.get(CHARSMAP, b""),
        add_dummy_prefix=bool(normalizer.get(ADD_DUMMY_PREFIX, True)),
        remove_extra_whitespaces=bool(normalizer.get(REMOVE_EXTRA_WHITESPACES, True)),
        escape_whitespaces=bool(normalizer.get(ESCAPE_WHITESPACES, True)),
    )
