"""Source checkpoints, read once for the converters: Hugging Face directories and CTranslate2 `model.bin`.

A family's converter names, in one key table, which source tensors make each of its own (ours -> source: several
are concatenated along dim 0, None stands for zeros, e.g. the key bias Whisper lacks) and `remap` builds them,
asserting the table against the module and every key and shape against the checkpoint, as nanoGPT's
`from_pretrained` does. Nothing here knows a family.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ConversionError, some

Table = dict[str, tuple[str | None, ...]]
Select = Callable[[str], bool]
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the file names transformers saves, in its order of preference


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None


def read_json_if(path: Path) -> dict | list | None:
    """The JSON at `path`, or None where there is no such file."""
    return read_json(path) if Path(path).exists() else None


def hf_tensors(src: Path, select: Select | None = None, names: tuple[str, ...] = HF_WEIGHTS) -> dict[str, Tensor]:
    """The (selected) tensors of a checkpoint directory: `<stem>.safetensors`, sharded (`<stem>.safetensors.index.json`)
    or not, else a pickled `.bin` read with weights_only; `names` are the file names to look for, in order."""
    from safetensors import safe_open

    keep = select or (lambda _: True)
    for name in names:
        index = src / f"{name}.index.json"
        if name.endswith(".safetensors") and (index.exists() or (src / name).exists()):
            shards = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else [name]
            tensors = {}
            for shard in shards:
                try:
                    with safe_open(src / shard, framework="pt") as f:
                        tensors |= {k: f.get_tensor(k) for k in f.keys() if keep(k)}  # noqa: SIM118 (not iterable)
                except Exception as e:  # safetensors raises its own error types for a damaged file
                    raise ConversionError(f"cannot read {src / shard}: {e}") from None
            return tensors
        if (src / name).exists():
            try:
                state = torch.load(src / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle, zip and torch errors alike mean an unreadable file
                raise ConversionError(f"cannot read {src / name}: {e}") from None
            state = state.get("state_dict", state)  # some trainers nest the weights
            return {k: v for k, v in state.items() if keep(k)}
    raise ConversionError(f"{src}: no {' or '.join(names)}")


def expected_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the module `build()` makes, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


def strip_prefix(tensors: dict[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Drop the first of `prefixes` that every key starting with it shares (a task model nesting its encoder)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in tensors):
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def remap(
    src: Path, table: Table, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], ignored: Iterable[str] = ()
) -> dict[str, Tensor]:
    """Our tensors from the checkpoint's `tensors` by `table`, in float32 where floating point.

    Every tensor of ours must be in the table (an assert: the table is code), every source tensor the table names
    must be in the checkpoint, and every checkpoint tensor must be used unless its name starts with one of
    `ignored` (index buffers, heads we do not run); each result must have the module's shape."""
    assert table.keys() == shapes.keys(), f"key table and module disagree on {some(table.keys() ^ shapes.keys())}"
    ignored = tuple(ignored)
    used = {key for keys in table.values() for key in keys if key}
    if missing := used - tensors.keys():
        raise ConversionError(f"{src}: the checkpoint has no tensor {some(missing)}")
    if unused := {k for k in tensors.keys() - used if not k.startswith(ignored)}:
        raise ConversionError(f"{src}: unexpected tensor {some(unused)} (not part of this model)")
    out = {}
    for name, keys in table.items():
        real = [tensors[k] for k in keys if k]
        parts = [tensors[k] if k else torch.zeros_like(real[0]) for k in keys]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ConversionError(f"{src}: {', '.join(map(str, keys))} have shapes {[tuple(p.shape) for p in parts]}")
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        if tuple(t.shape) != shapes[name]:
            raise ConversionError(
                f"{src}: {' + '.join(k or 'zeros' for k in keys)} has shape {tuple(t.shape)} for '{name}', "
                f"the config implies {shapes[name]}"
            )
        out[name] = (t.float() if t.is_floating_point() else t).contiguous()
    return out


# -- tokenizers ------------------------------------------------------------------------------

Bpe = Callable[[dict[str, int], list[tuple[str, str]]], str]


def tokenizer_json(src: Path, bpe: Bpe | None = None, lowercase: bool = True) -> str:
    """The tokenizer.json text of a checkpoint, from the files its release ships: `tokenizer.json` as it is;
    `vocab.json` + `merges.txt` through the family's `bpe` builder (CLIP and RoBERTa pre-tokenise differently);
    a WordPiece `vocab.txt` as transformers' BertTokenizerFast builds it (`lowercase` from its tokenizer_config)."""
    if (src / "tokenizer.json").exists():
        return (src / "tokenizer.json").read_text()
    if bpe is not None and (src / "vocab.json").exists() and (src / "merges.txt").exists():
        from tokenizers.models import BPE

        vocab, merges = BPE.read_file(str(src / "vocab.json"), str(src / "merges.txt"))
        return bpe(vocab, merges)
    if (src / "vocab.txt").exists():
        from tokenizers.implementations import BertWordPieceTokenizer

        return BertWordPieceTokenizer(str(src / "vocab.txt"), lowercase=lowercase).to_str()
    expected = "tokenizer.json" + (", vocab.json + merges.txt" if bpe else "") + " or vocab.txt"
    raise ConversionError(f"{src}: no tokenizer files ({expected})")


# -- CTranslate2 -----------------------------------------------------------------------------

# model.bin: version, spec name, revision, then (name, shape, dtype, bytes) per variable, then aliases
# (name -> name of an equal variable). Little-endian throughout.
CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
CT2_VERSION = 6


def ct2_variables(path: Path, spec: str, select: Select) -> dict[str, Tensor]:
    """The selected variables of a CTranslate2 model.bin holding a `spec` (e.g. WhisperSpec), aliases resolved,
    int8/int16 weights dequantised by their `*_scale` (which `select` must keep too), all in float32."""
    return _dequantize(read_ct2(path, spec, select))


def read_ct2(path: Path, spec: str, select: Select) -> dict[str, Tensor]:
    """The selected variables as stored (int8 weights and their scales apart), aliases resolved."""
    try:
        with open(path, "rb") as f:

            def unpack(fmt: str) -> tuple:
                size = struct.calcsize("<" + fmt)
                data = f.read(size)
                if len(data) != size:
                    raise ConversionError(f"{path} is truncated")
                return struct.unpack("<" + fmt, data)

            def string() -> str:
                (n,) = unpack("H")
                return f.read(n)[:-1].decode()

            (version,) = unpack("I")
            if version != CT2_VERSION:
                raise ConversionError(f"{path}: CTranslate2 binary version {version}, only {CT2_VERSION} is supported")
            found, (_revision, count) = string(), unpack("II")
            if found != spec:
                raise ConversionError(f"{path} holds a {found}, not a {spec}")
            entries = {}  # name -> (offset, shape, dtype id, bytes)
            for _ in range(count):
                name = string()
                (rank,) = unpack("B")
                shape = unpack(f"{rank}I")
                dtype_id, nbytes = unpack("BI")
                if nbytes != math.prod(shape) * CT2_DTYPES[dtype_id].itemsize:
                    raise ConversionError(f"{path}: variable {name!r} has {nbytes} bytes for shape {shape}")
                entries[name] = (f.tell(), shape, dtype_id, nbytes)
                f.seek(nbytes, 1)
            (n_aliases,) = unpack("I")
            # A duplicate keeps the alphabetically first name, so an encoder alias may point into the decoder.
            aliases = dict((string(), string()) for _ in range(n_aliases))
            variables = {}
            for name in [n for n in [*entries, *aliases] if select(n)]:
                offset, shape, dtype_id, nbytes = entries[aliases.get(name, name)]
                f.seek(offset)
                data = bytearray(f.read(nbytes))
                if len(data) != nbytes:
                    raise ConversionError(f"{path} is truncated")
                variables[name] = torch.frombuffer(data, dtype=CT2_DTYPES[dtype_id]).reshape(shape)
    except (OSError, IndexError, UnicodeDecodeError, KeyError) as e:
        raise ConversionError(f"cannot read {path}: {e!r}") from None
    return variables


def _dequantize(variables: dict[str, Tensor]) -> dict[str, Tensor]:
    """int8/int16 weights with their `*_scale` (per output row, or one scalar) -> float32; the rest as float32."""
    out = {}
    for name, value in variables.items():
        if name.endswith("_scale"):
            continue
        value = value.float()
        if (scale := variables.get(name + "_scale")) is not None:
            value = value / scale.float().reshape(-1, *[1] * (value.dim() - 1))
        out[name] = value
    return out
