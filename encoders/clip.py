"""CLIP: a ViT image tower and a causal text tower projected into one embedding space.

Weights come from a Hugging Face CLIP checkpoint (`convert_hf`, one explicit key table) or
from training `CLIP(dims)` directly; `export_hf` writes the inverse, so transformers can
check a model we trained ourselves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from . import checkpoint, image
from .block import ACTIVATIONS, Block, Embedding, LayerNorm, Linear, normal
from .errors import ConversionError, ModelLoadError
from .model import TOWERS, Encoder, Item, softmax_scores
from .options import Options
from .text import TextTokenizer
from .vocab import BOS, EOS, clip_bpe
from .weights import StoredModel, load_state

# transformers keeps OpenAI's original pooling (at the highest token id) for configs whose
# eos_token_id is 2, a placeholder old checkpoints carry; any other id pools at its first occurrence.
HF_LEGACY_EOS_ID = 2


@dataclass(frozen=True)
class CLIPDims:
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    eos_token_id: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    legacy_eos_pooling: bool = False  # pool at argmax(input_ids) instead of the first eos_token_id

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("vision_width and text_width must be multiples of their head counts")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


def pool_eos(x: Tensor, input_ids: Tensor, eos_token_id: int, legacy: bool) -> Tensor:
    """x: (batch, seq, width) -> (batch, width), at each row's end-of-text token."""
    index = input_ids.argmax(-1) if legacy else (input_ids == eos_token_id).int().argmax(-1)
    return x[torch.arange(x.shape[0], device=x.device), index]


class VisionTower(nn.Module):
    def __init__(self, dims: CLIPDims):
        super().__init__()
        width = dims.vision_width
        self.patch_embed = nn.Conv2d(3, width, dims.patch_size, stride=dims.patch_size, bias=False)
        self.class_embedding = normal(width, std=width**-0.5)
        self.positional_embedding = normal((dims.image_size // dims.patch_size) ** 2 + 1, width, std=width**-0.5)
        self.ln_pre = LayerNorm(width, eps=dims.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(width, dims.vision_heads, dims.vision_mlp, dims.activation, norm_first=True, eps=dims.layer_norm_eps)
            for _ in range(dims.vision_layers)
        )
        self.ln_post = LayerNorm(width, eps=dims.layer_norm_eps)
        self.proj = Linear(width, dims.embed_dim, bias=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (batch, 3, image_size, image_size) -> (batch, embed_dim)."""
        x = self.patch_embed(pixel_values.type(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))


class TextTower(nn.Module):
    def __init__(self, dims: CLIPDims):
        super().__init__()
        width = dims.text_width
        self.eos_token_id, self.legacy_eos_pooling = dims.eos_token_id, dims.legacy_eos_pooling
        self.token_embedding = Embedding(dims.vocab_size, width, std=0.02)
        self.positional_embedding = normal(dims.context_length, width, std=0.01)
        self.blocks = nn.ModuleList(
            Block(width, dims.text_heads, dims.text_mlp, dims.activation, norm_first=True, eps=dims.layer_norm_eps)
            for _ in range(dims.text_layers)
        )
        self.ln_final = LayerNorm(width, eps=dims.layer_norm_eps)
        self.proj = Linear(width, dims.embed_dim, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (batch, seq <= context_length), right-padded -> (batch, embed_dim)."""
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        mask = attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = block(x, mask, causal=True)
        x = pool_eos(self.ln_final(x), input_ids, self.eos_token_id, self.legacy_eos_pooling)
        return self.proj(x)


class CLIP(nn.Module):
    def __init__(self, dims: CLIPDims):
        super().__init__()
        self.dims = dims
        self.vision = VisionTower(dims)
        self.text = TextTower(dims)
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (batch, 3, image_size, image_size) -> unnormalised (batch, embed_dim)."""
        return self.vision(pixel_values)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (batch, seq) int, right-padded -> unnormalised (batch, embed_dim)."""
        return self.text(input_ids, attention_mask)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """-> logits_per_image (n_images, n_texts): scaled cosine similarities, as the contrastive loss takes them."""
        images = F.normalize(self.encode_image(pixel_values), dim=-1)
        texts = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        return self.logit_scale.exp() * images @ texts.t()


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast for reduced-precision compute; LayerNorm computes in fp32, so its parameters stay fp32 and exact."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()
    return model


class ClipEncoder(Encoder):
    modalities = TOWERS["clip"]

    def __init__(self, name: str, stored: StoredModel, options: Options = Options()):
        super().__init__(name, stored, options)
        try:
            self.dims = CLIPDims(**stored.config)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{name}: not a valid CLIP config: {e}") from None
        if stored.tokenizer is None:
            raise ModelLoadError(f"{name}: the CLIP store has no tokenizer")
        self.device = options.torch_device
        self.tokenizer = TextTokenizer(stored.tokenizer, self.dims.context_length)

    def build(self, stored: StoredModel) -> nn.Module:
        with torch.device("meta"):  # no random init and no copy: the module takes the stored tensors themselves
            model = CLIP(self.dims)
        load_state(model, stored, self.name, assign=True)
        return _cast(model, self.options.torch_dtype).to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.dims.embed_dim

    @property
    def logit_scale(self) -> float:
        """What CLIP multiplies cosine similarities by before its zero-shot softmax."""
        return float(self.stored.tensors["logit_scale"].float().exp())

    def score(self, cosines: np.ndarray) -> np.ndarray:
        """Zero-shot: a softmax over the labels (the last axis) of logit_scale · cos."""
        return softmax_scores(cosines, self.logit_scale)

    def embed(self, modality: str, items: Sequence[Item]) -> np.ndarray:
        self.check_modality(modality)
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            if modality == "image":
                pixels = torch.from_numpy(np.stack(items)).to(self.device, self.options.torch_dtype)
                return self.finish(self.model.encode_image(pixels))
            ids, mask = self.tokenizer(items)
            return self.finish(
                self.model.encode_text(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))
            )


# --- Hugging Face checkpoints ----------------------------------------------------------

# ours <- HF. A tuple of several HF tensors is concatenated along dim 0 (q, k, v -> qkv).
TOP_KEYS = {
    "logit_scale": ("logit_scale",),
    "vision.patch_embed.weight": ("vision_model.embeddings.patch_embedding.weight",),
    "vision.class_embedding": ("vision_model.embeddings.class_embedding",),
    "vision.positional_embedding": ("vision_model.embeddings.position_embedding.weight",),
    "vision.ln_pre.weight": ("vision_model.pre_layrnorm.weight",),
    "vision.ln_pre.bias": ("vision_model.pre_layrnorm.bias",),
    "vision.ln_post.weight": ("vision_model.post_layernorm.weight",),
    "vision.ln_post.bias": ("vision_model.post_layernorm.bias",),
    "vision.proj.weight": ("visual_projection.weight",),
    "text.token_embedding.weight": ("text_model.embeddings.token_embedding.weight",),
    "text.positional_embedding": ("text_model.embeddings.position_embedding.weight",),
    "text.ln_final.weight": ("text_model.final_layer_norm.weight",),
    "text.ln_final.bias": ("text_model.final_layer_norm.bias",),
    "text.proj.weight": ("text_projection.weight",),
}
BLOCK_KEYS = {
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out.weight": ("self_attn.out_proj.weight",),
    "attn.out.bias": ("self_attn.out_proj.bias",),
    "ln1.weight": ("layer_norm1.weight",),
    "ln1.bias": ("layer_norm1.bias",),
    "mlp.fc1.weight": ("mlp.fc1.weight",),
    "mlp.fc1.bias": ("mlp.fc1.bias",),
    "mlp.fc2.weight": ("mlp.fc2.weight",),
    "mlp.fc2.bias": ("mlp.fc2.bias",),
    "ln2.weight": ("layer_norm2.weight",),
    "ln2.bias": ("layer_norm2.bias",),
}
IGNORED_KEYS = (
    "text_model.embeddings.position_ids",
    "vision_model.embeddings.position_ids",
)  # index buffers old checkpoints saved

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPImageProcessor defaults, for keys a checkpoint leaves out.
BICUBIC = 3  # PIL's resample code, as HF configs store it
HF_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
HF_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
HF_IMAGE_DEFAULTS = dict(
    size={"shortest_edge": 224},
    crop_size={"height": 224, "width": 224},
    resample=BICUBIC,
    image_mean=list(image.OPENAI_CLIP_MEAN),
    image_std=list(image.OPENAI_CLIP_STD),
    rescale_factor=image.RESCALE,
    do_resize=True,
    do_center_crop=True,
    do_rescale=True,
    do_normalize=True,
    do_convert_rgb=True,
)


def key_table(dims: CLIPDims) -> dict[str, tuple[str, ...]]:
    """Every tensor of CLIP(dims) -> the HF CLIPModel tensors it is made of."""
    table = dict(TOP_KEYS)
    for ours, hf, layers in (("vision", "vision_model", dims.vision_layers), ("text", "text_model", dims.text_layers)):
        for i in range(layers):
            table |= {
                f"{ours}.blocks.{i}.{k}": tuple(f"{hf}.encoder.layers.{i}.{s}" for s in v)
                for k, v in BLOCK_KEYS.items()
            }
    return table


def dims_from_hf(config: dict) -> CLIPDims:
    """A CLIPModel config.json -> CLIPDims."""
    text = HF_TEXT_DEFAULTS | (config.get("text_config") or {}) | (config.get("text_config_dict") or {})
    vision = HF_VISION_DEFAULTS | (config.get("vision_config") or {}) | (config.get("vision_config_dict") or {})
    if text["hidden_act"] != vision["hidden_act"] or text["layer_norm_eps"] != vision["layer_norm_eps"]:
        raise ConversionError("text and vision towers with different activations or layer norm eps are not supported")
    if vision["num_channels"] != 3:
        raise ConversionError(f"only 3-channel (RGB) vision towers are supported, not {vision['num_channels']}")
    try:
        return CLIPDims(
            embed_dim=config.get("projection_dim", 512),
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
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
            eos_token_id=text["eos_token_id"],
            activation=text["hidden_act"],
            layer_norm_eps=text["layer_norm_eps"],
            legacy_eos_pooling=text["eos_token_id"] == HF_LEGACY_EOS_ID,
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"unsupported CLIP config: {e}") from None


def preprocess_from_hf(config: dict, dims: CLIPDims) -> dict:
    """A preprocessor_config.json -> the store's `preprocess` dict (keyword arguments of image.preprocess)."""
    config = HF_IMAGE_DEFAULTS | config
    off = [
        k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb") if config[k] is False
    ]
    if off:
        raise ConversionError(f"preprocessor settings {', '.join(off)} = false are not supported")
    if config["resample"] != BICUBIC or not math.isclose(config["rescale_factor"], image.RESCALE):
        raise ConversionError(
            f"only bicubic resizing and 1/255 rescaling are supported, not resample={config['resample']}, "
            f"rescale_factor={config['rescale_factor']}"
        )
    size, crop = config["size"], config["crop_size"]
    size = size if isinstance(size, int) else size.get("shortest_edge")
    crop = crop if isinstance(crop, int) else crop.get("height") if crop.get("height") == crop.get("width") else None
    if not isinstance(size, int) or crop != dims.image_size or size < crop:
        raise ConversionError(
            f"preprocessor size {config['size']} / crop_size {config['crop_size']} is not supported: "
            f"need a shortest_edge >= a square crop of the model's {dims.image_size} pixels"
        )
    mean, std = [float(m) for m in config["image_mean"]], [float(s) for s in config["image_std"]]
    return {"size": size, "crop_size": crop, "mean": mean, "std": std}


def convert_hf(src: Path) -> StoredModel:
    """A Hugging Face CLIPModel checkpoint directory -> a CLIP StoredModel."""
    src = Path(src)
    dims = dims_from_hf(checkpoint.read_json(src / "config.json"))
    image_config = checkpoint.read_json_if(src / "preprocessor_config.json") or {}
    shapes = checkpoint.expected_shapes(lambda: CLIP(dims))
    tensors = checkpoint.remap(src, key_table(dims), checkpoint.hf_tensors(src), shapes, ignored=IGNORED_KEYS)
    tokenizer = checkpoint.tokenizer_json(src, bpe=clip_bpe)
    return StoredModel("clip", asdict(dims), tensors, preprocess_from_hf(image_config, dims), tokenizer)


def hf_config(dims: CLIPDims) -> dict:
    """CLIPDims -> a CLIPModel config.json."""
    if dims.legacy_eos_pooling != (dims.eos_token_id == HF_LEGACY_EOS_ID):
        raise ConversionError(
            f"transformers pools at argmax(input_ids) exactly when eos_token_id == {HF_LEGACY_EOS_ID}; "
            f"eos_token_id={dims.eos_token_id} with legacy_eos_pooling={dims.legacy_eos_pooling} has no HF equivalent"
        )
    common = {"hidden_act": dims.activation, "layer_norm_eps": dims.layer_norm_eps, "projection_dim": dims.embed_dim}
    text = dict(
        vocab_size=dims.vocab_size,
        hidden_size=dims.text_width,
        intermediate_size=dims.text_mlp,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        max_position_embeddings=dims.context_length,
        eos_token_id=dims.eos_token_id,
    )
    vision = dict(
        hidden_size=dims.vision_width,
        intermediate_size=dims.vision_mlp,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        num_channels=3,
        image_size=dims.image_size,
        patch_size=dims.patch_size,
    )
    return dict(
        architectures=["CLIPModel"],
        model_type="clip",
        projection_dim=dims.embed_dim,
        text_config=common | text,
        vision_config=common | vision,
    )


def export_hf(stored: StoredModel, dest: Path) -> Path:
    """A CLIP StoredModel -> a Hugging Face CLIPModel checkpoint directory (the inverse of convert_hf)."""
    if stored.kind != "clip" or stored.tokenizer is None:
        raise ConversionError(f"export_hf needs a CLIP store with a tokenizer, not kind {stored.kind!r}")
    dims = CLIPDims(**stored.config)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for ours, parts in key_table(dims).items():
        pieces = stored.tensors[ours].chunk(len(parts)) if len(parts) > 1 else (stored.tensors[ours],)
        tensors |= {k: t.contiguous() for k, t in zip(parts, pieces)}
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    p = stored.preprocess
    preprocessor = HF_IMAGE_DEFAULTS | dict(
        image_processor_type="CLIPImageProcessor",
        size={"shortest_edge": p["size"]},
        crop_size={"height": p["crop_size"], "width": p["crop_size"]},
        image_mean=p["mean"],
        image_std=p["std"],
    )
    tokenizer_config = dict(
        # the tokenizer.json as it is: transformers' CLIPTokenizer would rebuild CLIP's BPE pipeline around its
        # vocabulary, mis-tokenising any other tokenizer (the word-level one of shapes-clip)
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=dims.context_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
    configs = {
        "config.json": hf_config(dims),
        "preprocessor_config.json": preprocessor,
        "tokenizer_config.json": tokenizer_config,
    }
    for name, content in configs.items():
        (dest / name).write_text(json.dumps(content, indent=2) + "\n")
    (dest / "tokenizer.json").write_text(stored.tokenizer)
    return dest
