"""SigLIP (and fixed-resolution SigLIP 2): a ViT pooled by attention and a bidirectional text tower, scored by sigmoid.

Unlike CLIP the image tower has no class token: a multihead attention pooling head (MAP) with one learned query
pools the patches; the text tower has no causal mask and no attention mask, reads every text padded to its full
length and pools at the last position, as big_vision trained it. A label's zero-shot score is
sigmoid(exp(logit_scale) · cos + logit_bias), independently per label. Weights come from a Hugging Face `SiglipModel`
directory (`convert_hf`); SigLIP 2's fixed-resolution releases use the same model with a Gemma tokenizer.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import Unigram
from torch import Tensor, nn

from . import checkpoint, image, spiece
from .block import ACTIVATIONS, MLP, Block, Embedding, LayerNorm, Linear, normal
from .clip import BLOCK_KEYS, _cast
from .errors import ConversionError, ModelLoadError
from .model import TOWERS, Encoder, Item
from .options import Options
from .text import TextTokenizer
from .weights import StoredModel, load_state


@dataclass(frozen=True)
class SiglipDims:
    image_size: int
    patch_size: int
    vision_width: int  # also the embedding size: the text head projects to it
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    context_length: int  # every text is padded to this many tokens
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    pad_token_id: int
    activation: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("vision_width and text_width must be multiples of their head counts")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary of {self.vocab_size}")


class AttentionPool(nn.Module):
    """The MAP head: one learned query attends over every token, then a residual MLP (nn.MultiheadAttention's
    in_proj holds q, k and v stacked; the query is projected from the probe alone, keys and values from the tokens)."""

    def __init__(self, width: int, heads: int, hidden: int, activation: str, eps: float):
        super().__init__()
        self.heads = heads
        self.probe = normal(1, 1, width)
        self.qkv = Linear(width, 3 * width)
        self.out = Linear(width, width)
        self.ln = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden, activation)

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, seq, width) -> (batch, width)."""
        b, t, w = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(self.probe, weight[:w], bias[:w]).view(1, self.heads, 1, w // self.heads).expand(b, -1, -1, -1)
        k, v = F.linear(x, weight[w:], bias[w:]).view(b, t, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, w))
        return (y + self.mlp(self.ln(y)))[:, 0]


class VisionTower(nn.Module):
    def __init__(self, dims: SiglipDims):
        super().__init__()
        width, eps = dims.vision_width, dims.layer_norm_eps
        self.patch_embed = nn.Conv2d(3, width, dims.patch_size, stride=dims.patch_size)
        self.positional_embedding = normal((dims.image_size // dims.patch_size) ** 2, width, std=width**-0.5)
        self.blocks = nn.ModuleList(
            Block(width, dims.vision_heads, dims.vision_mlp, dims.activation, norm_first=True, eps=eps)
            for _ in range(dims.vision_layers)
        )
        self.ln_post = LayerNorm(width, eps=eps)
        self.head = AttentionPool(width, dims.vision_heads, dims.vision_mlp, dims.activation, eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (batch, 3, image_size, image_size) -> (batch, vision_width)."""
        x = self.patch_embed(pixel_values.type(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_post(x))


class TextTower(nn.Module):
    def __init__(self, dims: SiglipDims):
        super().__init__()
        width, eps = dims.text_width, dims.layer_norm_eps
        self.token_embedding = Embedding(dims.vocab_size, width, std=width**-0.5)
        self.positional_embedding = normal(dims.context_length, width, std=width**-0.5)
        self.blocks = nn.ModuleList(
            Block(width, dims.text_heads, dims.text_mlp, dims.activation, norm_first=True, eps=eps)
            for _ in range(dims.text_layers)
        )
        self.ln_final = LayerNorm(width, eps=eps)
        self.proj = Linear(width, dims.vision_width)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (batch, context_length), padded to full length -> (batch, vision_width), pooled at the last
        position. Padding is attended to, not masked: the model was trained that way."""
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_final(x[:, -1]))


class SigLIP(nn.Module):
    def __init__(self, dims: SiglipDims):
        super().__init__()
        self.dims = dims
        self.vision = VisionTower(dims)
        self.text = TextTower(dims)
        # the paper's initialisation; shape (1,) as Hugging Face stores them
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (batch, 3, image_size, image_size) -> unnormalised (batch, vision_width)."""
        return self.vision(pixel_values)

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """input_ids: (batch, context_length) -> unnormalised (batch, vision_width)."""
        return self.text(input_ids)

    def forward(self, pixel_values: Tensor, input_ids: Tensor) -> Tensor:
        """-> logits (n_images, n_texts), each the log-odds that the pair matches, as the sigmoid loss takes them."""
        images = F.normalize(self.encode_image(pixel_values), dim=-1)
        texts = F.normalize(self.encode_text(input_ids), dim=-1)
        return self.logit_scale.exp() * images @ texts.t() + self.logit_bias


def sigmoid_scores(cosines: np.ndarray, logit_scale: float, logit_bias: float) -> np.ndarray:
    """cosines (..., n_labels) -> the probability that each label applies, each on its own (they need not sum to 1)."""
    logits = logit_scale * np.asarray(cosines, dtype=np.float64) + logit_bias
    return 1 / (1 + np.exp(-logits))


class SiglipEncoder(Encoder):
    modalities = TOWERS["siglip"]

    def __init__(self, name: str, stored: StoredModel, options: Options = Options()):
        super().__init__(name, stored, options)
        try:
            self.dims = SiglipDims(**stored.config)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{name}: not a valid SigLIP config: {e}") from None
        if stored.tokenizer is None:
            raise ModelLoadError(f"{name}: the SigLIP store has no tokenizer")
        self.device = options.torch_device
        self.tokenizer = TextTokenizer(
            stored.tokenizer, self.dims.context_length, self.dims.pad_token_id, padding="max_length"
        )

    def build(self, stored: StoredModel) -> nn.Module:
        with torch.device("meta"):  # no random init and no copy: the module takes the stored tensors themselves
            model = SigLIP(self.dims)
        load_state(model, stored, self.name, assign=True)
        return _cast(model, self.options.torch_dtype).to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.dims.vision_width

    def score(self, cosines: np.ndarray) -> np.ndarray:
        """Zero-shot: sigmoid(exp(logit_scale) · cos + logit_bias), per label."""
        t = self.stored.tensors
        return sigmoid_scores(cosines, float(t["logit_scale"].float().exp()), float(t["logit_bias"].float()))

    def embed(self, modality: str, items: Sequence[Item]) -> np.ndarray:
        self.check_modality(modality)
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            if modality == "image":
                pixels = torch.from_numpy(np.stack(items)).to(self.device, self.options.torch_dtype)
                return self.finish(self.model.encode_image(pixels))
            ids, _ = self.tokenizer(items)
            return self.finish(self.model.encode_text(torch.from_numpy(ids).to(self.device)))


# --- tokenizers ------------------------------------------------------------------------------

SIGLIP_SPECIALS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}  # SiglipTokenizer's defaults
GEMMA_PAD = "<pad>"  # GemmaTokenizer's default pad token
# Gemma-tokenised SigLIP 2 was trained on lowercased text; its releases name GemmaTokenizer, which does not
# lowercase, where transformers' Siglip2Tokenizer (the same tokenizer.json behind a Lowercase) does.
SIGLIP2_TOKENIZERS = ("GemmaTokenizer", "Siglip2Tokenizer")
PYTHON_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"  # str.isspace(), which re's \s matches
SPIECE_UNDERLINE = "▁"


def _char_class(chars: str) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


def tokenizer_kind(src: Path) -> str:
    """How a SigLIP release ships its tokenizer: "spiece" (SiglipTokenizer: spiece.model), "siglip2" (a Gemma
    tokenizer.json, lowercased) or "tokenizer.json" (any other tokenizer.json, used as it is)."""
    name = _tokenizer_class(checkpoint.read_json_if(src / "tokenizer_config.json") or {})
    if (src / "spiece.model").exists() and name in ("", "SiglipTokenizer"):
        return "spiece"
    if (src / "tokenizer.json").exists():
        return "siglip2" if name in SIGLIP2_TOKENIZERS else "tokenizer.json"
    raise ConversionError(f"{src}: no tokenizer (spiece.model for SigLIP, tokenizer.json for SigLIP 2)")


def _tokenizer_class(config: dict) -> str:
    return (config.get("tokenizer_class") or "").removesuffix("Fast")


def _token(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else value  # an AddedToken, as some configs save them


def spiece_tokenizer(model: spiece.SentencePieceModel, config: dict) -> Tokenizer:
    """transformers' SiglipTokenizer (a slow, SentencePiece one) as a tokenizers pipeline. It canonicalises the text
    (lowercased, ASCII punctuation removed, whitespace runs folded to one space, stripped), prefixes "▁" and encodes
    "<unk>" + text with SentencePiece, dropping the pieces of "<unk>": so the dummy prefix is its own "▁" and no
    leading whitespace of the text is removed. Pieces never span a "▁" (split_by_whitespace), so encoding the text
    alone gives the same pieces."""
    if model.model_type != spiece.UNIGRAM or model.treat_whitespace_as_suffix or not model.split_by_whitespace:
        raise ConversionError("only unigram SentencePiece models split by whitespace, as prefix, are supported")
    tokenizer = Tokenizer(Unigram([(p, s) for p, s, _ in model.pieces], model.unk_id, model.byte_fallback))
    steps = [normalizers.Replace(SPIECE_UNDERLINE, " "), normalizers.Prepend(SPIECE_UNDERLINE)]
    if config.get("do_lower_case", True):
        steps.append(normalizers.Lowercase())
    whitespace = _char_class(PYTHON_WHITESPACE)
    steps += [
        normalizers.Replace(Regex(_char_class(string.punctuation)), ""),
        normalizers.Replace(Regex(whitespace + "+"), " "),
        normalizers.Replace(Regex(whitespace + r"+\z"), ""),  # str.strip(); the text now starts with "▁"
    ]
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:  # after "<unk>", only runs and the end are SentencePiece's to trim
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r" +\z"), "")]
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Metaspace()
    specials = {key: _token(config, key, default) for key, default in SIGLIP_SPECIALS.items()}
    for token in specials.values():
        if model.piece_id(token) is None:
            raise ConversionError(f"the SentencePiece model has no piece {token!r}")
    tokenizer.add_special_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False) for t in specials.values()])
    eos = specials["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, model.piece_id(eos))]
    )
    return tokenizer


def tokenizer_from_hf(src: Path) -> tuple[str, int]:
    """A SigLIP release's tokenizer files -> (tokenizer.json text, pad token id). A tokenizer.json's post-processor
    decides BOS / EOS, as in transformers 5 (which ignores tokenizer_config's add_bos_token / add_eos_token then)."""
    config = checkpoint.read_json_if(src / "tokenizer_config.json") or {}
    kind = tokenizer_kind(src)
    if kind == "spiece":
        tokenizer = spiece_tokenizer(spiece.read(src / "spiece.model"), config)
    else:
        try:
            tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ConversionError(f"cannot read {src / 'tokenizer.json'}: {e}") from None
        if kind == "siglip2":
            lower = [normalizers.Lowercase()] + ([tokenizer.normalizer] if tokenizer.normalizer else [])
            tokenizer.normalizer = normalizers.Sequence(lower)
    pad = _token(config, "pad_token", GEMMA_PAD if kind == "siglip2" else SIGLIP_SPECIALS["pad_token"])
    if (pad_id := tokenizer.token_to_id(pad)) is None:
        raise ConversionError(f"{src}: the tokenizer has no pad token {pad!r}")
    return tokenizer.to_str(), pad_id


# --- Hugging Face checkpoints ----------------------------------------------------------------

# ours <- HF SiglipModel; a tuple of several tensors is concatenated along dim 0 (q, k, v -> qkv)
TOP_KEYS = {
    "logit_scale": ("logit_scale",),
    "logit_bias": ("logit_bias",),
    "vision.patch_embed.weight": ("vision_model.embeddings.patch_embedding.weight",),
    "vision.patch_embed.bias": ("vision_model.embeddings.patch_embedding.bias",),
    "vision.positional_embedding": ("vision_model.embeddings.position_embedding.weight",),
    "vision.ln_post.weight": ("vision_model.post_layernorm.weight",),
    "vision.ln_post.bias": ("vision_model.post_layernorm.bias",),
    "vision.head.probe": ("vision_model.head.probe",),
    "vision.head.qkv.weight": ("vision_model.head.attention.in_proj_weight",),
    "vision.head.qkv.bias": ("vision_model.head.attention.in_proj_bias",),
    "vision.head.out.weight": ("vision_model.head.attention.out_proj.weight",),
    "vision.head.out.bias": ("vision_model.head.attention.out_proj.bias",),
    "vision.head.ln.weight": ("vision_model.head.layernorm.weight",),
    "vision.head.ln.bias": ("vision_model.head.layernorm.bias",),
    "vision.head.mlp.fc1.weight": ("vision_model.head.mlp.fc1.weight",),
    "vision.head.mlp.fc1.bias": ("vision_model.head.mlp.fc1.bias",),
    "vision.head.mlp.fc2.weight": ("vision_model.head.mlp.fc2.weight",),
    "vision.head.mlp.fc2.bias": ("vision_model.head.mlp.fc2.bias",),
    "text.token_embedding.weight": ("text_model.embeddings.token_embedding.weight",),
    "text.positional_embedding": ("text_model.embeddings.position_embedding.weight",),
    "text.ln_final.weight": ("text_model.final_layer_norm.weight",),
    "text.ln_final.bias": ("text_model.final_layer_norm.bias",),
    "text.proj.weight": ("text_model.head.weight",),
    "text.proj.bias": ("text_model.head.bias",),
}
IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")  # index buffers

# transformers' SiglipTextConfig / SiglipVisionConfig / SiglipImageProcessor defaults, for keys a checkpoint omits
HF_TEXT_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=64,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    projection_size=None,  # = hidden_size
)
HF_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=True,
)
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as HF configs store them
HF_IMAGE_DEFAULTS = dict(
    size={"height": 224, "width": 224},
    resample=3,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    rescale_factor=image.RESCALE,
    do_resize=True,
    do_rescale=True,
    do_normalize=True,
    do_convert_rgb=True,
    do_center_crop=False,
)


def key_table(dims: SiglipDims) -> dict[str, tuple[str, ...]]:
    """Every tensor of SigLIP(dims) -> the HF SiglipModel tensors it is made of."""
    table = dict(TOP_KEYS)
    for ours, hf, layers in (("vision", "vision_model", dims.vision_layers), ("text", "text_model", dims.text_layers)):
        for i in range(layers):
            table |= {
                f"{ours}.blocks.{i}.{k}": tuple(f"{hf}.encoder.layers.{i}.{s}" for s in v)
                for k, v in BLOCK_KEYS.items()
            }
    return table


def _square(value: int | Sequence[int], what: str) -> int:
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return value[0]
    raise ConversionError(f"only square {what} are supported, not {value}")


def dims_from_hf(config: dict, pad_token_id: int) -> SiglipDims:
    """A SiglipModel config.json -> SiglipDims."""
    text = HF_TEXT_DEFAULTS | (config.get("text_config") or {})
    vision = HF_VISION_DEFAULTS | (config.get("vision_config") or {})
    if text["hidden_act"] != vision["hidden_act"] or text["layer_norm_eps"] != vision["layer_norm_eps"]:
        raise ConversionError("text and vision towers with different activations or layer norm eps are not supported")
    if not vision["vision_use_head"]:
        raise ConversionError(
            "a vision tower without its attention pooling head (vision_use_head=false) is not supported"
        )
    if vision["num_channels"] != 3:
        raise ConversionError(f"only 3-channel (RGB) vision towers are supported, not {vision['num_channels']}")
    if (text["projection_size"] or text["hidden_size"]) != vision["hidden_size"]:
        raise ConversionError(
            f"the text head projects to {text['projection_size']}, not to the vision width {vision['hidden_size']}"
        )
    try:
        return SiglipDims(
            image_size=_square(vision["image_size"], "images"),
            patch_size=_square(vision["patch_size"], "patches"),
            vision_width=vision["hidden_size"],
            vision_layers=vision["num_hidden_layers"],
            vision_heads=vision["num_attention_heads"],
            vision_mlp=vision["intermediate_size"],
            context_length=text["max_position_embeddings"],
            vocab_size=text["vocab_size"],
            text_width=text["hidden_size"],
            text_layers=text["num_hidden_layers"],
            text_heads=text["num_attention_heads"],
            text_mlp=text["intermediate_size"],
            pad_token_id=pad_token_id,
            activation=text["hidden_act"],
            layer_norm_eps=text["layer_norm_eps"],
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"unsupported SigLIP config: {e}") from None


def preprocess_from_hf(config: dict, dims: SiglipDims) -> dict:
    """A SiglipImageProcessor preprocessor_config.json -> the store's `preprocess` (image.preprocess arguments)."""
    config = HF_IMAGE_DEFAULTS | {k: v for k, v in config.items() if v is not None}
    off = [k for k in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb") if config[k] is False]
    if off or config["do_center_crop"]:
        raise ConversionError(f"preprocessor settings {', '.join(off) or 'do_center_crop'} are not supported")
    if config["resample"] not in RESAMPLE or not math.isclose(config["rescale_factor"], image.RESCALE):
        raise ConversionError(
            f"only bilinear or bicubic resizing and 1/255 rescaling are supported, not resample={config['resample']}, "
            f"rescale_factor={config['rescale_factor']}"
        )
    size = config["size"]
    if not isinstance(size, dict) or size.get("height") != dims.image_size or size.get("width") != dims.image_size:
        raise ConversionError(f"preprocessor size {size} is not the model's {dims.image_size}x{dims.image_size}")
    mean, std = ([float(x) for x in config[k]] for k in ("image_mean", "image_std"))
    return dict(
        size=dims.image_size,
        crop_size=dims.image_size,
        mean=mean,
        std=std,
        resize="squash",
        resample=RESAMPLE[config["resample"]],
    )


def convert_hf(src: Path) -> StoredModel:
    """A Hugging Face SiglipModel checkpoint directory (SigLIP, or fixed-resolution SigLIP 2) -> a SigLIP StoredModel."""
    src = Path(src)
    tokenizer, pad_id = tokenizer_from_hf(src)
    dims = dims_from_hf(checkpoint.read_json(src / "config.json"), pad_id)
    image_config = checkpoint.read_json_if(src / "preprocessor_config.json") or {}
    shapes = checkpoint.expected_shapes(lambda: SigLIP(dims))
    tensors = checkpoint.remap(src, key_table(dims), checkpoint.hf_tensors(src), shapes, ignored=IGNORED_KEYS)
    return StoredModel("siglip", asdict(dims), tensors, preprocess_from_hf(image_config, dims), tokenizer)
