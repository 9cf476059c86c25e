"""Whisper's audio encoder as an embedding model: dims, modules, key tables.

An audio clip's embedding is the mean of the encoder's last hidden states over every real
position of the clip: all 1500 positions of each 30 s window in `padded` mode, the
positions of the clip's own frames in `trimmed` mode (see `encoders.audio`). A clip longer
than 30 s is several windows, encoded in one batch, and its mean runs over all of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import audio, checkpoint
from .block import Block, LayerNorm
from .checkpoint import Table
from .errors import AudioValidationError, ConversionError, ModelLoadError
from .model import TOWERS, Encoder, Item
from .options import Options
from .weights import StoredModel, load_state
from .whisper_decoder import (
    DECODER,
    DECODER_CONFIG,
    TOKENS_CONFIG,
    DecoderDims,
    SpecialTokens,
    TextDecoder,
    ct2_decoder,
    hf_decoder,
)


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
    modalities = TOWERS["whisper"]

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

    @property
    def can_transcribe(self) -> bool:
        return DECODER_CONFIG in self.config

    def _need_decoder(self) -> None:
        if not self.can_transcribe:
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


# Key tables, ours -> source. None stands for zeros: the key bias Whisper lacks (the shared block's fused
# projection has one).
def hf_table(layers: int) -> Table:
    """Ours -> transformers' WhisperEncoder (under `model.encoder.` or `encoder.`)."""
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


def ct2_table(layers: int) -> Table:
    """Ours -> CTranslate2's WhisperSpec encoder variables (under `encoder/`)."""
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


def _stored(src: Path, dims: WhisperDims, table: Table, tensors: dict[str, Tensor]) -> StoredModel:
    tensors = checkpoint.remap(src, table, tensors, checkpoint.expected_shapes(lambda: AudioEncoder(dims)))
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


def convert_hf(src: Path) -> StoredModel:
    """A Hugging Face Whisper checkpoint directory -> its encoder as a weight store, with the decoder for a
    WhisperForConditionalGeneration."""
    config = checkpoint.read_json(src / "config.json")
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
    if pre := checkpoint.read_json_if(src / "preprocessor_config.json"):
        pre["n_mels"] = pre.pop("feature_size", dims.n_mels)
        if differ := {k: pre[k] for k, v in audio.settings(dims.n_mels).items() if k in pre and pre[k] != v}:
            raise ConversionError(
                f"{src}/preprocessor_config.json: {differ} differ from Whisper's {audio.settings(dims.n_mels)}"
            )
    # WhisperForConditionalGeneration nests the encoder under `model.`; WhisperModel does not.
    found = checkpoint.hf_tensors(src, lambda k: k.startswith(("model.encoder.", "encoder.")))
    tensors = checkpoint.strip_prefix(found, ("model.encoder.", "encoder."))
    stored = _stored(src, dims, hf_table(dims.layers), tensors)
    # A bare WhisperModel (an encoder for embeddings) converts as the encoder alone; the ASR model adds its decoder.
    if "WhisperForConditionalGeneration" in (config.get("architectures") or []):
        found = checkpoint.hf_tensors(src, lambda k: k.startswith("model.decoder.") or k == "proj_out.weight")
        return _with_decoder(stored, hf_decoder(src, config, found, dims.width))
    return stored


def convert_ct2(src: Path) -> StoredModel:
    """A CTranslate2 Whisper directory (model.bin, config.json, vocabulary, tokenizer.json) -> a weight store."""
    variables = checkpoint.ct2_variables(src / "model.bin", "WhisperSpec", lambda name: name.startswith("encoder/"))
    tensors = {k.removeprefix("encoder/"): v for k, v in variables.items()}
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
    stored = _stored(src, dims, ct2_table(dims.layers), tensors)
    decoder = checkpoint.ct2_variables(src / "model.bin", "WhisperSpec", lambda name: name.startswith("decoder/"))
    return _with_decoder(stored, ct2_decoder(src, decoder, dims.width))
