"""Whisper's audio encoder as an embedding model, and its converters.

An audio clip's embedding is the mean of the encoder's last hidden states over every real
position of the clip: all 1500 positions of each 30 s window in `padded` mode, the
positions of the clip's own frames in `trimmed` mode (see `encoders.audio`). A clip longer
than 30 s is several windows, encoded in one batch, and its mean runs over all of them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import audio
from .block import Block, LayerNorm
from .decoding import SpecialTokens
from .errors import AudioValidationError, ConversionError, ModelLoadError
from .model import MODALITIES, Encoder, Item, Options
from .store import StoredModel, load_state
from .whisper_decoder import DECODER, DECODER_CONFIG, TOKENS_CONFIG, DecoderDims, TextDecoder, ct2_decoder, hf_decoder


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int  # mel bands of the input (80; 128 for large-v3)
    n_ctx: int  # encoder positions: 1500 for 30 s
    width: int
    heads: int
    layers: int
    hidden: int  # MLP width


class AudioEncoder(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.conv1 = nn.Conv1d(dims.n_mels, dims.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.width, dims.width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.empty(dims.n_ctx, dims.width))
        self.blocks = nn.ModuleList(
            Block(dims.width, dims.heads, dims.hidden, "gelu", norm_first=True) for _ in range(dims.layers)
        )
        self.ln_post = LayerNorm(dims.width)

    def forward(self, mel: Tensor, lengths: Tensor | None = None) -> Tensor:
        """mel: (batch, n_mels, n_frames), zero past each row's length; lengths: (batch,) even frame counts,
        None when every row is real throughout -> (batch, n_frames // 2, width).

        Positions past `lengths // 2` are padding: they are kept out of attention, and with even
        lengths the stride-2 convolution never reaches past a row's last frame, so a row's real
        positions come out as if it were encoded alone.
        """
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positional_embedding[: x.shape[1]]
        mask = None
        if lengths is not None and bool((lengths < mel.shape[2]).any()):
            mask = (torch.arange(x.shape[1], device=x.device) < lengths[:, None] // 2)[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_post(x)


MAX_WINDOWS = 64  # 30 s windows per forward pass, so a batch holding hours of audio stays within memory


class WhisperEncoder(Encoder):
    modalities = MODALITIES["whisper"]

    def __init__(self, name: str, stored: StoredModel, options: Options = Options()):
        super().__init__(name, stored, options)
        self.dims = WhisperDims(**encoder_config(stored.config))
        if stored.preprocess != audio.settings(self.dims.n_mels):
            raise ModelLoadError(
                f"model {name!r}: feature settings {stored.preprocess} differ from Whisper's {audio.settings(self.dims.n_mels)}"
            )

    def build(self, stored: StoredModel) -> nn.Module:
        model = AudioEncoder(self.dims)
        encoder = {k: v for k, v in stored.tensors.items() if not k.startswith(DECODER)}
        load_state(model, replace(stored, tensors=encoder), self.name)
        return model.to(self.options.torch_device, self.options.torch_dtype).eval()

    @property
    def dim(self) -> int:
        return self.dims.width

    # -- transcription (encoders.transcribe): the decoder is built on first use, so embedding never reads it --

    @cached_property
    def decoder(self) -> TextDecoder:
        self._need_decoder()
        with torch.device("meta"):  # the stored tensors become its weights: no random init to overwrite
            model = TextDecoder(DecoderDims(**self.config[DECODER_CONFIG]))
        tensors = {k.removeprefix(DECODER): v for k, v in self.stored.tensors.items() if k.startswith(DECODER)}
        load_state(model, replace(self.stored, tensors=tensors), self.name, assign=True)
        return model.to(self.options.torch_device, self.options.torch_dtype).eval()

    @cached_property
    def special_tokens(self) -> SpecialTokens:
        self._need_decoder()
        return SpecialTokens.from_config(self.config[TOKENS_CONFIG])

    def _need_decoder(self) -> None:
        if DECODER_CONFIG not in self.config:
            raise ModelLoadError(f"model {self.name!r} holds Whisper's encoder alone: it cannot transcribe")

    def _check(self, item: Item) -> np.ndarray:
        if not isinstance(item, np.ndarray) or item.ndim != 2 or item.shape[0] != self.dims.n_mels:
            shape = getattr(item, "shape", type(item).__name__)
            raise AudioValidationError(f"audio features must be an array ({self.dims.n_mels}, n_frames), not {shape}")
        if item.shape[1] == 0 or item.shape[1] % 2:
            raise AudioValidationError(f"audio features need a positive, even frame count, not {item.shape[1]}")
        return item

    def embed(self, modality: str, items: Sequence[Item]) -> np.ndarray:
        """Features -> (n, width): the mean over every real position of each clip's windows."""
        self.check_modality(modality)
        windows, owner = [], []
        for i, item in enumerate(items):
            for window in audio.split_windows(self._check(item)):
                windows.append(window)
                owner.append(i)
        total, count = torch.zeros(len(items), self.dim), torch.zeros(len(items))
        # Similar lengths side by side pad least, when a batch holds more than one pass of windows.
        order = sorted(range(len(windows)), key=lambda j: windows[j].shape[1])
        for start in range(0, len(order), MAX_WINDOWS):
            chunk = order[start : start + MAX_WINDOWS]
            sums, counts = self._pool([windows[j] for j in chunk])
            index = torch.tensor([owner[j] for j in chunk])
            total.index_add_(0, index, sums)
            count.index_add_(0, index, counts)
        return self.finish(total / count[:, None])

    def _pool(self, windows: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Windows, padded to the longest -> each one's sum of real hidden states (on the CPU), and their count."""
        lengths = torch.tensor([w.shape[1] for w in windows])
        mel = np.zeros((len(windows), self.dims.n_mels, int(lengths.max())), np.float32)
        for row, window in zip(mel, windows):
            row[:, : window.shape[1]] = window
        device = self.options.torch_device
        with torch.inference_mode():
            hidden = self.model(torch.from_numpy(mel).to(device, self.options.torch_dtype), lengths.to(device)).float()
            real = (torch.arange(hidden.shape[1]) < lengths[:, None] // 2).to(device)
            return (hidden * real[..., None]).sum(1).cpu(), real.sum(1).float().cpu()


# Converters: a source checkpoint's encoder tensors -> our names, by one table per format.
# Each entry lists the source tensors concatenated into ours; None stands for zeros, the key
# bias Whisper lacks (the shared block's fused projection has one).
Table = dict[str, tuple[str | None, ...]]


def _hf_table(layers: int) -> Table:
    table: Table = {
        "conv1.weight": ("conv1.weight",),
        "conv1.bias": ("conv1.bias",),
        "conv2.weight": ("conv2.weight",),
        "conv2.bias": ("conv2.bias",),
        "positional_embedding": ("embed_positions.weight",),
        "ln_post.weight": ("layer_norm.weight",),
        "ln_post.bias": ("layer_norm.bias",),
    }
    for i in range(layers):
        src, attn, dst = f"layers.{i}.", f"layers.{i}.self_attn.", f"blocks.{i}."
        table |= {
            dst + "attn.qkv.weight": (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
            dst + "attn.qkv.bias": (attn + "q_proj.bias", None, attn + "v_proj.bias"),
            dst + "attn.out.weight": (attn + "out_proj.weight",),
            dst + "attn.out.bias": (attn + "out_proj.bias",),
            dst + "ln1.weight": (src + "self_attn_layer_norm.weight",),
            dst + "ln1.bias": (src + "self_attn_layer_norm.bias",),
            dst + "mlp.fc1.weight": (src + "fc1.weight",),
            dst + "mlp.fc1.bias": (src + "fc1.bias",),
            dst + "mlp.fc2.weight": (src + "fc2.weight",),
            dst + "mlp.fc2.bias": (src + "fc2.bias",),
            dst + "ln2.weight": (src + "final_layer_norm.weight",),
            dst + "ln2.bias": (src + "final_layer_norm.bias",),
        }
    return table


def _ct2_table(layers: int) -> Table:
    table: Table = {
        "conv1.weight": ("conv1/weight",),
        "conv1.bias": ("conv1/bias",),
        "conv2.weight": ("conv2/weight",),
        "conv2.bias": ("conv2/bias",),
        "positional_embedding": ("position_encodings/encodings",),
        "ln_post.weight": ("layer_norm/gamma",),
        "ln_post.bias": ("layer_norm/beta",),
    }
    for i in range(layers):
        attn, ffn, dst = f"layer_{i}/self_attention/", f"layer_{i}/ffn/", f"blocks.{i}."
        table |= {
            dst + "attn.qkv.weight": (attn + "linear_0/weight",),  # q, k and v come fused
            dst + "attn.qkv.bias": (attn + "linear_0/bias",),
            dst + "attn.out.weight": (attn + "linear_1/weight",),
            dst + "attn.out.bias": (attn + "linear_1/bias",),
            dst + "ln1.weight": (attn + "layer_norm/gamma",),
            dst + "ln1.bias": (attn + "layer_norm/beta",),
            dst + "mlp.fc1.weight": (ffn + "linear_0/weight",),
            dst + "mlp.fc1.bias": (ffn + "linear_0/bias",),
            dst + "mlp.fc2.weight": (ffn + "linear_1/weight",),
            dst + "mlp.fc2.bias": (ffn + "linear_1/bias",),
            dst + "ln2.weight": (ffn + "layer_norm/gamma",),
            dst + "ln2.bias": (ffn + "layer_norm/beta",),
        }
    return table


def _remap(src: Path, dims: WhisperDims, table: Table, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Build every tensor of `AudioEncoder(dims)` from `tensors`, which must all be used."""
    with torch.device("meta"):
        expected = AudioEncoder(dims).state_dict()
    assert table.keys() == expected.keys(), "the converter table must name every encoder tensor"
    used = {key for keys in table.values() for key in keys if key}
    for problem, names in (("missing", used - tensors.keys()), ("unexpected", tensors.keys() - used)):
        if names:
            first, *more = sorted(names)
            raise ConversionError(
                f"{src}: {problem} encoder tensor {first!r}" + (f" (and {len(more)} more)" if more else "")
            )
    out = {}
    for name, keys in table.items():
        parts = [tensors[k].float() if k else torch.zeros(dims.width) for k in keys]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ConversionError(
                f"{src}: {', '.join(map(str, keys))} have shapes {[tuple(p.shape) for p in parts]} that do not fuse"
            )
        t = torch.cat(parts)
        if t.shape != expected[name].shape:
            raise ConversionError(
                f"{src}: {' + '.join(k or 'zeros' for k in keys)} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}"
            )
        out[name] = t.contiguous()
    return out


def _stored(dims: WhisperDims, tensors: dict[str, Tensor]) -> StoredModel:
    return StoredModel("whisper", asdict(dims), tensors, audio.settings(dims.n_mels))


def _with_decoder(stored: StoredModel, decoder: StoredModel) -> StoredModel:
    return replace(
        stored,
        config=stored.config | decoder.config,
        tensors=stored.tensors | decoder.tensors,
        tokenizer=decoder.tokenizer,
    )


def encoder_config(config: dict) -> dict:
    """A store's config -> the encoder's dims alone (a store with a decoder adds its dims and tokens)."""
    return {k: v for k, v in config.items() if k not in (DECODER_CONFIG, TOKENS_CONFIG)}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None


def _hf_tensors(src: Path, select: Callable[[str], bool]) -> dict[str, Tensor]:
    """The selected tensors of a Hugging Face checkpoint (safetensors, sharded or not, or pytorch_model.bin)."""
    from safetensors import safe_open

    if (src / "model.safetensors.index.json").exists():
        shards = sorted(set(_read_json(src / "model.safetensors.index.json")["weight_map"].values()))
    elif (src / "model.safetensors").exists():
        shards = ["model.safetensors"]
    elif (src / "pytorch_model.bin").exists():
        try:
            state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ConversionError(f"cannot read {src / 'pytorch_model.bin'}: {e}") from None
        return {k: v for k, v in state.items() if select(k)}
    else:
        raise ConversionError(f"{src}: no model.safetensors or pytorch_model.bin")
    tensors = {}
    for shard in shards:
        try:
            with safe_open(src / shard, framework="pt") as f:
                tensors |= {k: f.get_tensor(k) for k in f.keys() if select(k)}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as e:
            raise ConversionError(f"cannot read {src / shard}: {e}") from None
    return tensors


def convert_hf(src: Path) -> StoredModel:
    """A Hugging Face Whisper checkpoint directory -> its encoder as a weight store, with the decoder for a
    WhisperForConditionalGeneration."""
    config = _read_json(src / "config.json")
    if config.get("activation_function", "gelu") != "gelu":
        raise ConversionError(f"{src}: activation {config['activation_function']!r} is not Whisper's gelu")
    try:
        dims = WhisperDims(
            n_mels=config["num_mel_bins"],
            n_ctx=config["max_source_positions"],
            width=config["d_model"],
            heads=config["encoder_attention_heads"],
            layers=config["encoder_layers"],
            hidden=config["encoder_ffn_dim"],
        )
    except KeyError as e:
        raise ConversionError(f"{src}/config.json lacks {e}") from None
    if (src / "preprocessor_config.json").exists():
        pre = _read_json(src / "preprocessor_config.json")
        pre["n_mels"] = pre.pop("feature_size", dims.n_mels)
        if differ := {k: pre[k] for k, v in audio.settings(dims.n_mels).items() if k in pre and pre[k] != v}:
            raise ConversionError(
                f"{src}/preprocessor_config.json: {differ} differ from Whisper's {audio.settings(dims.n_mels)}"
            )
    # WhisperForConditionalGeneration nests the encoder under `model.`; WhisperModel does not.
    found = _hf_tensors(src, lambda k: k.startswith(("model.encoder.", "encoder.")))
    prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in found) else "encoder."
    tensors = {k.removeprefix(prefix): v for k, v in found.items() if k.startswith(prefix)}
    stored = _stored(dims, _remap(src, dims, _hf_table(dims.layers), tensors))
    # A bare WhisperModel (an encoder for embeddings) converts as the encoder alone; the ASR model adds its decoder.
    if "WhisperForConditionalGeneration" in (config.get("architectures") or []):
        found = _hf_tensors(src, lambda k: k.startswith("model.decoder.") or k == "proj_out.weight")
        return _with_decoder(stored, hf_decoder(src, config, found, dims.width))
    return stored


# CTranslate2 model.bin: version, spec name, revision, then (name, shape, dtype, bytes) per
# variable, then aliases (name -> name of an equal variable). Little-endian throughout.
CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
CT2_VERSION = 6


def read_ct2(path: Path, select: Callable[[str], bool]) -> dict[str, Tensor]:
    """The selected variables of a CTranslate2 model.bin, aliases resolved, as stored (no dequantisation)."""
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
            spec, (_revision, count) = string(), unpack("II")
            if spec != "WhisperSpec":
                raise ConversionError(f"{path} holds a {spec}, not a WhisperSpec")
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


def convert_ct2(src: Path) -> StoredModel:
    """A CTranslate2 Whisper directory (model.bin, config.json, vocabulary, tokenizer.json) -> a weight store."""
    variables = read_ct2(src / "model.bin", lambda name: name.startswith("encoder/"))
    tensors = _dequantize({k.removeprefix("encoder/"): v for k, v in variables.items()})
    try:
        heads = int(tensors.pop("num_heads"))
        conv1, fc1 = tensors["conv1/weight"], tensors["layer_0/ffn/linear_0/weight"]
        dims = WhisperDims(
            n_mels=conv1.shape[1],
            n_ctx=tensors["position_encodings/encodings"].shape[0],
            width=conv1.shape[0],
            heads=heads,
            layers=len({k.split("/")[0] for k in tensors if re.match(r"layer_\d+/", k)}),
            hidden=fc1.shape[0],
        )
    except KeyError as e:
        raise ConversionError(f"{src / 'model.bin'}: no encoder/{e.args[0]}") from None
    stored = _stored(dims, _remap(src, dims, _ct2_table(dims.layers), tensors))
    decoder = _dequantize(read_ct2(src / "model.bin", lambda name: name.startswith("decoder/")))
    return _with_decoder(stored, ct2_decoder(src, decoder, dims.width))
