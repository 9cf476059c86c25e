"""BERT-family sentence encoder (all-MiniLM-L6-v2, any BERT / RoBERTa checkpoint), as sentence-transformers runs it.

Post-LN blocks over word + position + token-type embeddings, then one pooling mode over the
unpadded tokens and, where the checkpoint's `modules.json` lists a Normalize module, L2
normalisation. `convert_hf` reads a Hugging Face / sentence-transformers directory once into
the weight store; the network below then loads it with no remapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from .block import ACTIVATIONS, Block, Embedding, LayerNorm
from .checkpoint import Table
from .errors import ConversionError
from .model import TOWERS, Encoder, Item
from .options import Options
from .text import TextTokenizer
from .weights import StoredModel, load_state

POOLING = ("mean", "cls", "max")
DEFAULT_MAX_SEQ_LENGTH = 512  # sentence-transformers' cap when a checkpoint sets none
CHUNK = 64  # texts per forward pass; a large batch is sorted by length first so each chunk pads little (64: 3-11% faster than 128)


@dataclass(frozen=True)
class BertDims:
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    activation: str
    max_seq_length: int  # tokens per text, special tokens included; longer texts are truncated
    pooling: str = "mean"
    normalize: bool = False  # the checkpoint ends in a Normalize module
    pad_id: int = 0
    position_offset: int = 0  # RoBERTa numbers positions from pad_id + 1


class Bert(nn.Module):
    def __init__(self, dims: BertDims):
        super().__init__()
        self.dims = dims
        self.token_embedding = Embedding(dims.vocab_size, dims.width)
        self.position_embedding = Embedding(dims.max_positions, dims.width)
        self.type_embedding = Embedding(dims.type_vocab_size, dims.width)
        self.ln = LayerNorm(dims.width, eps=dims.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(dims.width, dims.heads, dims.mlp, dims.activation, norm_first=False, eps=dims.layer_norm_eps)
            for _ in range(dims.layers)
        )

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (batch, seq), mask 1 = token, 0 = padding -> hidden states (batch, seq, width)."""
        positions = torch.arange(ids.shape[1], device=ids.device) + self.dims.position_offset
        # a single text per input, so every token has type 0
        x = self.token_embedding(ids) + self.position_embedding(positions) + self.type_embedding.weight[0]
        x = self.ln(x)
        key_mask = mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return x


def pool(x: Tensor, mask: Tensor, mode: str) -> Tensor:
    """x: (batch, seq, width), mask: (batch, seq) -> (batch, width) in fp32, padding ignored."""
    x = x.float()
    if mode == "cls":
        return x[:, 0]
    keep = mask.unsqueeze(-1).float()
    if mode == "max":
        return x.masked_fill(keep == 0, float("-inf")).amax(dim=1)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)


class BertEncoder(Encoder):
    modalities = TOWERS["bert"]

    def __init__(self, name: str, stored: StoredModel, options: Options = Options()):
        super().__init__(name, stored, options)
        self.dims = BertDims(**stored.config)
        self.tokenizer = TextTokenizer(stored.tokenizer, self.dims.max_seq_length, self.dims.pad_id)

    def build(self, stored: StoredModel) -> nn.Module:
        with torch.device("meta"):  # skip random init; every weight comes from the store
            model = Bert(self.dims)
        load_state(model, stored, self.name, assign=True)
        return model.to(self.options.torch_device, self.options.torch_dtype).eval()

    @property
    def dim(self) -> int:
        return self.dims.width

    def embed(self, modality: str, items: Sequence[Item]) -> np.ndarray:
        self.check_modality(modality)
        texts = list(items)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), CHUNK):
            chunk = order[start : start + CHUNK]
            out[chunk] = self._embed_chunk([texts[i] for i in chunk])
        return out

    def _embed_chunk(self, texts: list[str]) -> np.ndarray:
        ids, mask = (torch.from_numpy(a).to(self.options.torch_device) for a in self.tokenizer(texts))
        with torch.inference_mode():
            x = pool(self.model(ids, mask), mask, self.dims.pooling)
            if self.dims.normalize:
                x = F.normalize(x, dim=-1)
        return self.finish(x)


# Key table, ours -> Hugging Face BertModel / RobertaModel (a task model's `bert.` or `roberta.` prefix stripped).
TOP_KEYS = {
    "token_embedding.weight": ("embeddings.word_embeddings.weight",),
    "position_embedding.weight": ("embeddings.position_embeddings.weight",),
    "type_embedding.weight": ("embeddings.token_type_embeddings.weight",),
    "ln.weight": ("embeddings.LayerNorm.weight",),
    "ln.bias": ("embeddings.LayerNorm.bias",),
}
BLOCK_KEYS = {
    "attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn.out": ("attention.output.dense",),
    "ln1": ("attention.output.LayerNorm",),
    "mlp.fc1": ("intermediate.dense",),
    "mlp.fc2": ("output.dense",),
    "ln2": ("output.LayerNorm",),
}
HF_PREFIXES = ("bert.", "roberta.")  # task-model checkpoints nest the encoder under one of these
# heads and index buffers a checkpoint may carry that the sentence encoder does not run
HF_UNUSED = (
    "pooler.",
    "cls.",
    "lm_head.",
    "classifier.",
    "qa_outputs.",
    "embeddings.position_ids",
    "embeddings.token_type_ids",
)
# sentence-transformers' older 1_Pooling/config.json: one boolean per mode
ST_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def hf_table(dims: BertDims) -> Table:
    """Every tensor of Bert(dims) -> the HF tensors it is made of."""
    table = dict(TOP_KEYS)
    for i in range(dims.layers):
        for ours, theirs in BLOCK_KEYS.items():
            for p in ("weight", "bias"):
                table[f"blocks.{i}.{ours}.{p}"] = tuple(f"encoder.layer.{i}.{t}.{p}" for t in theirs)
    return table


def _sentence_transformer_modules(src: Path) -> tuple[Path, str, bool]:
    """modules.json -> (the transformer's directory, pooling mode, normalize); plain HF: (src, 'mean', False)."""
    modules = checkpoint.read_json_if(src / "modules.json")
    if modules is None:
        return src, "mean", False
    transformer, pooling, normalize = src, "mean", False
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Transformer":
            transformer = src / module["path"]
        elif kind == "Pooling":
            pooling = _pooling_mode(checkpoint.read_json_if(src / module["path"] / "config.json") or {}, src)
        elif kind == "Normalize":
            normalize = True
        else:
            raise ConversionError(
                f"{src}: sentence-transformers module {module['type']!r} is not supported (only Transformer, Pooling, Normalize)"
            )
    return transformer, pooling, normalize


def _pooling_mode(config: dict, src: Path) -> str:
    mode = config.get("pooling_mode") or [m for k, m in ST_LEGACY_POOLING.items() if config.get(k)] or "mean"
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in POOLING:
        raise ConversionError(f"{src}: pooling {mode!r} is not supported (supported: {', '.join(POOLING)})")
    return mode


def convert_hf(src: Path) -> StoredModel:
    """A Hugging Face BERT-family or sentence-transformers checkpoint directory -> weight store (kind 'bert')."""
    src = Path(src)
    transformer, pooling, normalize = _sentence_transformer_modules(src)
    config = checkpoint.read_json_if(transformer / "config.json")
    if config is None:
        raise ConversionError(f"{transformer}: no config.json")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(
            f"{transformer}: position_embedding_type {config['position_embedding_type']!r} is not supported"
        )
    activation = config.get("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        raise ConversionError(f"{transformer}: activation {activation!r} is not supported ({', '.join(ACTIVATIONS)})")
    tokenizer_config = checkpoint.read_json_if(transformer / "tokenizer_config.json") or {}
    tokenizer = checkpoint.tokenizer_json(transformer, lowercase=tokenizer_config.get("do_lower_case", True))
    st_config = checkpoint.read_json_if(transformer / "sentence_bert_config.json") or {}
    pad_id = config.get("pad_token_id") or 0
    offset = pad_id + 1 if config.get("model_type") in ("roberta", "xlm-roberta") else 0
    try:
        positions = config["max_position_embeddings"]
        dims = BertDims(
            vocab_size=config["vocab_size"],
            width=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            mlp=config["intermediate_size"],
            max_positions=positions,
            type_vocab_size=config.get("type_vocab_size", 2),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            activation=activation,
            max_seq_length=min(st_config.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH, positions - offset),
            pooling=pooling,
            normalize=normalize,
            pad_id=pad_id,
            position_offset=offset,
        )
    except KeyError as e:
        raise ConversionError(f"{transformer / 'config.json'} has no {e.args[0]!r}") from None
    hf = checkpoint.strip_prefix(checkpoint.hf_tensors(transformer), HF_PREFIXES)
    shapes = checkpoint.expected_shapes(lambda: Bert(dims))
    tensors = checkpoint.remap(transformer, hf_table(dims), hf, shapes, ignored=HF_UNUSED)
    preprocess = {"lowercase": bool(st_config.get("do_lower_case", False))}
    return StoredModel("bert", asdict(dims), tensors, preprocess, tokenizer)
