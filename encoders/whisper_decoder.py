"""Whisper's text decoder beside the encoder of `encoders.whisper`: dims, modules, key tables, converters.

Token embedding plus learned positions, pre-LN blocks of causal self-attention (keys and values cached as
they are made), cross-attention over the encoder states, and logits through the tied token embedding. A store
keeps the decoder's tensors as `decoder.<name>` and its dims and special tokens under config keys of their own,
so a store without them (an older conversion, a bare WhisperModel) is the encoder alone and embeds as before.
The decoding itself (greedy search, Whisper's rules, the cache) is `encoders.decoding`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint, onednn
from .block import Attention, Block, Embedding, LayerNorm, Linear
from .checkpoint import Table
from .errors import ConversionError, ModelLoadError
from .weights import StoredModel

DECODER = "decoder."  # prefix of the decoder's tensors in a store
DECODER_CONFIG, TOKENS_CONFIG = "decoder", "tokens"  # their config keys


@dataclass(frozen=True)
class DecoderDims:
    n_vocab: int  # 51864 (.en), 51865 (multilingual), 51866 (large-v3): the text tokens, specials and timestamps
    n_ctx: int  # text positions: 448
    width: int  # the encoder's width too: cross-attention reads its states as they are
    heads: int
    layers: int
    hidden: int  # MLP width


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids decoding needs, as a store's config keeps them."""

    eot: int  # <|endoftext|>
    sot: int  # <|startoftranscript|>
    no_timestamps: int  # <|notimestamps|>; the timestamps <|0.00|>, <|0.02|>, ... follow it
    no_speech: int  # <|nospeech|> (<|nocaptions|> in older vocabularies)
    transcribe: int | None
    translate: int | None
    languages: dict[str, int]  # language code -> token, empty for an English-only model
    suppress: tuple[int, ...]  # never sampled: non-speech symbols and the special tokens
    suppress_begin: tuple[int, ...]  # not sampled first: the blank and <|endoftext|>

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @classmethod
    def from_config(cls, config: dict) -> SpecialTokens:
        return cls(
            **config | {"suppress": tuple(config["suppress"]), "suppress_begin": tuple(config["suppress_begin"])}
        )

    def to_config(self) -> dict:
        return asdict(self) | {"suppress": list(self.suppress), "suppress_begin": list(self.suppress_begin)}

    def prompt(self, language: str | None, timestamps: bool) -> list[int]:
        """The start-of-transcript sequence; `language` (a code of `languages`) only for a multilingual model."""
        prompt = [self.sot]
        if self.languages:
            if language not in self.languages:
                raise ModelLoadError(f"language {language!r} is not one of the model's: {', '.join(self.languages)}")
            prompt += [self.languages[language], self.transcribe]
        return prompt if timestamps else [*prompt, self.no_timestamps]


class Cache:
    """The decoder's keys and values for a batch of windows: self-attention's, written position by position,
    and cross-attention's, computed once from the windows' encoder states."""

    def __init__(self, decoder: TextDecoder, states: Tensor, length: int):
        """states: (batch, n_audio, width); length: the positions to hold."""
        dims = decoder.dims
        shape = (states.shape[0], dims.heads, length, dims.width // dims.heads)
        self.cross = [block.cross_attn.keys_values(states) for block in decoder.blocks]
        self.k = [states.new_empty(shape) for _ in decoder.blocks]
        self.v = [states.new_empty(shape) for _ in decoder.blocks]

    def layers(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per block: (self keys, self values, cross keys, cross values)."""
        return [(k, v, ck, cv) for k, v, (ck, cv) in zip(self.k, self.v, self.cross)]

    def keep(self, rows: Tensor) -> None:
        """Keep only `rows` (indices into the batch), in that order."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """scaled_dot_product_attention, but for one 16-bit query a row (every decoding step): there the CPU's flash
    kernel ran 4.7x slower than two matmuls with the softmax in fp32 (16 windows of tiny.en's cross-attention)."""
    if q.shape[2] > 1 or q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


class SelfAttention(Attention):
    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, offset: int) -> Tensor:
        """x: (batch, t, width) at positions offset..offset+t, whose keys and values are written into the caches
        (batch, heads, n_ctx, width // heads) -> (batch, t, width). Several tokens come only as the prompt, at 0."""
        b, t, w = x.shape
        assert t == 1 or offset == 0, "several tokens at once only as the prompt"
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        k_cache[:, :, offset : offset + t] = k
        v_cache[:, :, offset : offset + t] = v
        end = offset + t
        y = attention(q, k_cache[:, :, :end], v_cache[:, :, :end], causal=t > 1)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = Linear(width, width)
        self.kv = Linear(width, 2 * width)  # fused, as CTranslate2 stores them: computed once per window
        self.out = Linear(width, width)

    def keys_values(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """states: (batch, n_audio, width) -> keys, values (batch, heads, n_audio, width // heads)."""
        b, s, w = states.shape
        k, v = self.kv(states).view(b, s, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return k.contiguous(), v.contiguous()

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """x: (batch, t, width); k, v from `keys_values` -> (batch, t, width)."""
        b, t, w = x.shape
        q = self.q(x).view(b, t, self.heads, w // self.heads).transpose(1, 2)
        y = attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class DecoderBlock(Block):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__(width, heads, hidden, "gelu", norm_first=True)
        self.attn = SelfAttention(width, heads)
        self.cross_attn = CrossAttention(width, heads)
        self.ln_cross = LayerNorm(width)

    def forward(self, x: Tensor, layer: tuple[Tensor, Tensor, Tensor, Tensor], offset: int) -> Tensor:
        """x: (batch, t, width); layer: this block's (self keys, self values, cross keys, cross values)."""
        k_cache, v_cache, cross_k, cross_v = layer
        x = x + self.attn(self.ln1(x), k_cache, v_cache, offset)
        x = x + self.cross_attn(self.ln_cross(x), cross_k, cross_v)
        return x + self.mlp(self.ln2(x))


class TextDecoder(nn.Module):
    def __init__(self, dims: DecoderDims):
        super().__init__()
        self.dims = dims
        self.token_embedding = Embedding(dims.n_vocab, dims.width)
        self.register_buffer("positional_embedding", torch.empty(dims.n_ctx, dims.width))
        self.blocks = nn.ModuleList(DecoderBlock(dims.width, dims.heads, dims.hidden) for _ in range(dims.layers))
        self.ln = LayerNorm(dims.width)

    def forward(self, tokens: Tensor, cache: Cache, offset: int) -> Tensor:
        """tokens: (batch, t) at positions offset..offset+t -> (batch, t, width), the last hidden states."""
        x = self.token_embedding(tokens) + self.positional_embedding[offset : offset + tokens.shape[1]]
        for block, layer in zip(self.blocks, cache.layers()):
            x = block(x, layer, offset)
        return self.ln(x)

    def logits(self, x: Tensor) -> Tensor:
        """(..., width) -> (..., n_vocab) float32, through the token embedding (Whisper ties the two)."""
        if x.dtype == torch.float32:
            return onednn.linear(x, self.token_embedding.weight, None)
        return F.linear(x, self.token_embedding.weight).float()


def _ct2_decoder_table(layers: int) -> Table:
    table: Table = {
        "token_embedding.weight": ("embeddings/weight",),
        "positional_embedding": ("position_encodings/encodings",),
        "ln.weight": ("layer_norm/gamma",),
        "ln.bias": ("layer_norm/beta",),
    }
    for i in range(layers):
        src, dst = f"layer_{i}/", f"blocks.{i}."
        parts = {  # ours -> CTranslate2's, per weight/bias (gamma/beta) pair
            "attn.qkv": "self_attention/linear_0",  # q, k and v fused
            "attn.out": "self_attention/linear_1",
            "ln1": "self_attention/layer_norm",
            "cross_attn.q": "attention/linear_0",
            "cross_attn.kv": "attention/linear_1",  # k and v fused
            "cross_attn.out": "attention/linear_2",
            "ln_cross": "attention/layer_norm",
            "mlp.fc1": "ffn/linear_0",
            "mlp.fc2": "ffn/linear_1",
            "ln2": "ffn/layer_norm",
        }
        for ours, theirs in parts.items():
            weight, bias = ("gamma", "beta") if theirs.endswith("layer_norm") else ("weight", "bias")
            table |= {
                dst + ours + ".weight": (src + f"{theirs}/{weight}",),
                dst + ours + ".bias": (src + f"{theirs}/{bias}",),
            }
    return {DECODER + k: tuple(f"decoder/{s}" for s in v) for k, v in table.items()}


def _hf_decoder_table(layers: int) -> Table:
    table: Table = {
        "token_embedding.weight": ("embed_tokens.weight",),
        "positional_embedding": ("embed_positions.weight",),
        "ln.weight": ("layer_norm.weight",),
        "ln.bias": ("layer_norm.bias",),
    }
    for i in range(layers):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        attn, cross = src + "self_attn.", src + "encoder_attn."
        table |= {
            dst + "attn.qkv.weight": (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
            dst + "attn.qkv.bias": (attn + "q_proj.bias", None, attn + "v_proj.bias"),
            dst + "cross_attn.q.weight": (cross + "q_proj.weight",),
            dst + "cross_attn.q.bias": (cross + "q_proj.bias",),
            dst + "cross_attn.kv.weight": (cross + "k_proj.weight", cross + "v_proj.weight"),
            dst + "cross_attn.kv.bias": (None, cross + "v_proj.bias"),
        }
        pairs = {
            "attn.out": attn + "out_proj",
            "cross_attn.out": cross + "out_proj",
            "ln1": src + "self_attn_layer_norm",
        }
        pairs |= {"ln_cross": src + "encoder_attn_layer_norm", "mlp.fc1": src + "fc1", "mlp.fc2": src + "fc2"}
        pairs |= {"ln2": src + "final_layer_norm"}
        for ours, theirs in pairs.items():
            table |= {dst + ours + ".weight": (theirs + ".weight",), dst + ours + ".bias": (theirs + ".bias",)}
    return {DECODER + k: tuple(f"model.decoder.{s}" if s else None for s in v) for k, v in table.items()}


# -- converters: the decoder's tensors, read by `encoders.whisper`'s converters, and its special tokens --

# CTranslate2's decoder flags as Whisper's decoder has them (activation 3 = GELU), where a file has them (versions
# add flags); a model with other values, or with a flag not listed, is refused.
CT2_FLAGS = {"activation": 3, "pre_norm": 1, "scale_embeddings": 0, "start_from_zero_embedding": 0}
CT2_FLAGS |= {"alibi": 0, "alibi_use_positive_positions": 0, "scale_alibi": 0}
# Word timings' heads, which we do not make, and the output projection, which CTranslate2's Whisper spec writes as an
# alias of the token embedding (in an int8 model the alias's scale is not stored, so it cannot even be compared).
CT2_UNUSED = ("decoder/alignment_heads", "decoder/alignment_layer", "decoder/projection/weight")


def ct2_decoder(src: Path, tensors: dict[str, Tensor], width: int) -> StoredModel:
    """model.bin's `decoder/` variables (dequantised), config.json, the vocabulary and tokenizer.json of a
    CTranslate2 Whisper directory -> the decoder part of a store (tensors, config and tokenizer)."""
    path, tensors = src / "model.bin", dict(tensors)
    try:
        flags = {k: int(tensors.pop(f"decoder/{k}")) for k in CT2_FLAGS if f"decoder/{k}" in tensors}
        heads = int(tensors.pop("decoder/num_heads"))
        embedding = tensors["decoder/embeddings/weight"]
        dims = DecoderDims(
            n_vocab=embedding.shape[0],
            n_ctx=tensors["decoder/position_encodings/encodings"].shape[0],
            width=embedding.shape[1],
            heads=heads,
            layers=len({k.split("/")[1] for k in tensors if re.match(r"decoder/layer_\d+/", k)}),
            hidden=tensors["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        )
    except KeyError as e:
        raise ConversionError(f"{path}: no {e.args[0]}") from None
    if differ := {k: v for k, v in flags.items() if v != CT2_FLAGS[k]}:
        raise ConversionError(f"{path}: decoder flags {differ} are not Whisper's {CT2_FLAGS}")
    ours = _remap_decoder(path, dims, width, _ct2_decoder_table(dims.layers), tensors, CT2_UNUSED)

    config = checkpoint.read_json(src / "config.json")
    if (src / "vocabulary.json").exists():
        vocabulary = checkpoint.read_json(src / "vocabulary.json")
    elif (src / "vocabulary.txt").exists():
        vocabulary = (src / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
    else:
        raise ConversionError(f"{src}: no vocabulary.txt or vocabulary.json")
    ids = {token: i for i, token in enumerate(vocabulary) if token.startswith("<|")}
    try:
        tokens = SpecialTokens(
            eot=ids["<|endoftext|>"],
            sot=ids["<|startoftranscript|>"],
            no_timestamps=ids["<|notimestamps|>"],
            no_speech=ids.get("<|nospeech|>", ids.get("<|nocaptions|>")),
            transcribe=ids.get("<|transcribe|>"),
            translate=ids.get("<|translate|>"),
            # CTranslate2 lists language ids for English-only models too; only a multilingual vocabulary has them
            languages={vocabulary[i][2:-2]: i for i in config["lang_ids"]} if dims.n_vocab >= 51865 else {},
            suppress=tuple(config.get("suppress_ids") or ()),
            suppress_begin=tuple(config.get("suppress_ids_begin") or ()),
        )
    except KeyError as e:
        raise ConversionError(f"{src}: its vocabulary or config.json has no {e.args[0]}") from None
    return _part(dims, ours, tokens, src)


def hf_decoder(src: Path, config: dict, tensors: dict[str, Tensor], width: int) -> StoredModel:
    """A WhisperForConditionalGeneration's `model.decoder.*` (and `proj_out.weight`) tensors, config.json,
    generation_config.json and tokenizer.json -> the decoder part of a store."""
    generation = checkpoint.read_json_if(src / "generation_config.json") or {}
    settings, tensors = config | generation, dict(tensors)
    if config.get("scale_embedding"):
        raise ConversionError(f"{src}/config.json: scale_embedding is not Whisper's")
    try:
        dims = DecoderDims(
            n_vocab=config["vocab_size"],
            n_ctx=config["max_target_positions"],
            width=config["d_model"],
            heads=config["decoder_attention_heads"],
            layers=config["decoder_layers"],
            hidden=config["decoder_ffn_dim"],
        )
        no_timestamps, tasks = generation["no_timestamps_token_id"], generation.get("task_to_id", {})
        tokens = SpecialTokens(
            eot=settings["eos_token_id"],
            sot=settings["decoder_start_token_id"],
            no_timestamps=no_timestamps,
            no_speech=no_timestamps - 1,  # <|nospeech|> (<|nocaptions|>) in every Whisper vocabulary
            transcribe=tasks.get("transcribe"),
            translate=tasks.get("translate"),
            languages={k[2:-2]: v for k, v in generation.get("lang_to_id", {}).items()}
            if generation.get("is_multilingual")
            else {},
            suppress=tuple(settings.get("suppress_tokens") or ()),
            suppress_begin=tuple(settings.get("begin_suppress_tokens") or ()),
        )
    except KeyError as e:
        raise ConversionError(f"{src}: config.json or generation_config.json lacks {e}") from None
    projection, embedding = tensors.pop("proj_out.weight", None), tensors.get("model.decoder.embed_tokens.weight")
    if projection is not None and embedding is not None and not torch.equal(projection, embedding):
        raise ConversionError(f"{src}: proj_out.weight is not the token embedding, as Whisper's is")
    return _part(dims, _remap_decoder(src, dims, width, _hf_decoder_table(dims.layers), tensors), tokens, src)


def _part(dims: DecoderDims, tensors: dict[str, Tensor], tokens: SpecialTokens, src: Path) -> StoredModel:
    config = {DECODER_CONFIG: asdict(dims), TOKENS_CONFIG: tokens.to_config()}
    tokenizer = checkpoint.tokenizer_json(src) if (src / "tokenizer.json").exists() else None  # none: cannot transcribe
    return StoredModel("whisper", config, tensors, tokenizer=tokenizer)


def _remap_decoder(
    src: Path, dims: DecoderDims, width: int, table: Table, tensors: dict[str, Tensor], ignored: Sequence[str] = ()
) -> dict[str, Tensor]:
    """Every tensor of `TextDecoder(dims)`, as `decoder.<name>`, from `tensors` by `table`."""
    if dims.width != width:
        raise ConversionError(f"{src}: decoder width {dims.width} differs from the encoder's {width}")
    shapes = {DECODER + k: v for k, v in checkpoint.expected_shapes(lambda: TextDecoder(dims)).items()}
    return checkpoint.remap(src, table, tensors, shapes, ignored)
