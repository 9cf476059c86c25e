"""OpenCLIP checkpoints -> a CLIP store: the ViT image tower and transformer text tower OpenCLIP shares with OpenAI.

A directory as open_clip's `push_to_hf_hub` writes it: `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg":
...}) and `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`. The towers must be the CLIP ones (no timm or
Hugging Face tower, no CoCa decoder, no layer scale or custom attention); a setting that needs a part our CLIP lacks
is one ConversionError naming it. OpenCLIP directories carry no tokenizer: their CLIP models use OpenAI's BPE,
bundled here, in transformers' CLIPTokenizer pipeline (NFC, whitespace folded, lowercased). open_clip's own also
runs ftfy and html.unescape, so text with HTML entities, curly quotes, ligatures or full-width forms tokenises
differently (as between transformers and OpenAI). Preprocessing is open_clip's eval transform: the short side
resized to the model's image size (or squashed to it), a centre crop placed as torchvision rounds it, mean / std
from the config; transparent images are composited onto white where open_clip's convert("RGB") drops the alpha.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from torch import Tensor

from . import checkpoint
from .clip import CLIP, HF_LEGACY_EOS_ID, CLIPDims
from .errors import ConversionError
from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .vocab import openai_bpe
from .weights import StoredModel

CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's save_for_hf names

# open_clip's CLIPVisionCfg / CLIPTextCfg defaults for the keys we read
VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224)
TEXT_DEFAULTS = dict(
    context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0, pool_type="argmax", eos_id=2
)
# Settings that need a part our CLIP lacks -> the value that means it is absent. Others (patch_dropout,
# output_tokens, the timm_* and hf_* options of towers we refuse anyway) do not change an eval forward.
UNSUPPORTED_MODEL = {"multimodal_cfg": None, "init_logit_bias": None}
UNSUPPORTED_TOWER = dict(
    ls_init_value=None,
    final_ln_after_pool=False,
    act_kwargs=None,
    block_type=None,
    qk_norm=False,
    scaled_cosine_attn=False,
    scale_heads=False,
    scale_attn_inner=False,
    scale_attn=False,
    scale_fc=False,
)
UNSUPPORTED_VISION = UNSUPPORTED_TOWER | dict(
    timm_model_name=None, attentional_pool=False, no_ln_pre=False, pool_type="tok"
)
UNSUPPORTED_TEXT = UNSUPPORTED_TOWER | dict(
    hf_model_name=None,
    hf_tokenizer_name=None,
    tokenizer_kwargs=None,
    embed_cls=False,
    no_causal_mask=False,
    proj_bias=False,
    proj_type="linear",
)
PARTS = {  # what a refused setting asks for, for the message
    "multimodal_cfg": "a CoCa text decoder",
    "init_logit_bias": "a sigmoid-loss logit_bias",
    "timm_model_name": "a timm image tower",
    "hf_model_name": "a Hugging Face text tower",
    "hf_tokenizer_name": "a Hugging Face tokenizer",
    "attentional_pool": "an attentional pooler",
    "ls_init_value": "layer scale",
}
POOLING = {"argmax": True, "eos": False}  # text pool_type -> legacy_eos_pooling
RESIZE = {"shortest": "shortest", "squash": "squash"}  # open_clip resize_mode -> image.preprocess resize
INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}  # random: bicubic at eval

# ours <- OpenCLIP. Text keys sit at the top level of open_clip's CLIP, under "text." in its CustomTextCLIP.
BLOCK_KEYS = {
    "attn.qkv.weight": ("attn.in_proj_weight",),
    "attn.qkv.bias": ("attn.in_proj_bias",),
    "attn.out.weight": ("attn.out_proj.weight",),
    "attn.out.bias": ("attn.out_proj.bias",),
    "ln1.weight": ("ln_1.weight",),
    "ln1.bias": ("ln_1.bias",),
    "mlp.fc1.weight": ("mlp.c_fc.weight",),
    "mlp.fc1.bias": ("mlp.c_fc.bias",),
    "mlp.fc2.weight": ("mlp.c_proj.weight",),
    "mlp.fc2.bias": ("mlp.c_proj.bias",),
    "ln2.weight": ("ln_2.weight",),
    "ln2.bias": ("ln_2.bias",),
}
# OpenCLIP projects as x @ P with P (width, embed_dim): transposed into our Linear weights before the table applies
TRANSPOSED = ("visual.proj", "text_projection")
IGNORED = ("attn_mask", "text.attn_mask")  # the causal mask buffer some checkpoints saved


def key_table(dims: CLIPDims, text: str) -> dict[str, tuple[str, ...]]:
    """Every tensor of CLIP(dims) -> the OpenCLIP tensor it is; `text` is the text tower's key prefix."""
    table = {
        "logit_scale": ("logit_scale",),
        "vision.patch_embed.weight": ("visual.conv1.weight",),
        "vision.class_embedding": ("visual.class_embedding",),
        "vision.positional_embedding": ("visual.positional_embedding",),
        "vision.ln_pre.weight": ("visual.ln_pre.weight",),
        "vision.ln_pre.bias": ("visual.ln_pre.bias",),
        "vision.ln_post.weight": ("visual.ln_post.weight",),
        "vision.ln_post.bias": ("visual.ln_post.bias",),
        "vision.proj.weight": ("visual.proj",),
        "text.token_embedding.weight": (f"{text}token_embedding.weight",),
        "text.positional_embedding": (f"{text}positional_embedding",),
        "text.ln_final.weight": (f"{text}ln_final.weight",),
        "text.ln_final.bias": (f"{text}ln_final.bias",),
        "text.proj.weight": (f"{text}text_projection",),
    }
    for ours, theirs, layers in (("vision", "visual.", dims.vision_layers), ("text", text, dims.text_layers)):
        for i in range(layers):
            table |= {
                f"{ours}.blocks.{i}.{k}": tuple(f"{theirs}transformer.resblocks.{i}.{s}" for s in v)
                for k, v in BLOCK_KEYS.items()
            }
    return table


def _refuse(config: dict, unsupported: dict, where: str) -> None:
    for key, absent in unsupported.items():
        value = config.get(key, absent)
        if value != absent and not (key == "block_type" and value == "default"):
            part = PARTS.get(key, f"{key}={value!r}")
            raise ConversionError(f"OpenCLIP {where} needs {part} ({key}), which mmembed's CLIP does not have")


def _eps(config: dict, where: str) -> float:
    norm = dict(config.get("norm_kwargs") or {})
    eps = norm.pop("eps", 1e-5)  # nn.LayerNorm's default
    if norm:
        raise ConversionError(f"OpenCLIP {where} norm_kwargs {sorted(norm)} are not supported (only eps)")
    return eps


def dims_from_openclip(model_cfg: dict) -> CLIPDims:
    """open_clip_config.json's model_cfg -> CLIPDims."""
    _refuse(model_cfg, UNSUPPORTED_MODEL, "model")
    vision_cfg, text_cfg = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    _refuse(vision_cfg, UNSUPPORTED_VISION, "vision_cfg")
    _refuse(text_cfg, UNSUPPORTED_TEXT, "text_cfg")
    vision, text = VISION_DEFAULTS | vision_cfg, TEXT_DEFAULTS | text_cfg
    if not isinstance(vision["layers"], int):
        raise ConversionError(
            "OpenCLIP vision_cfg needs a ModifiedResNet image tower (layers is a list), not supported"
        )
    if text["pool_type"] not in POOLING:
        raise ConversionError(f"OpenCLIP text pool_type {text['pool_type']!r} is not supported (only argmax, eos)")
    if text["vocab_size"] != 49408:
        raise ConversionError(f"OpenCLIP text vocab_size {text['vocab_size']} is not OpenAI's BPE (49408 tokens)")
    if (eps := _eps(vision, "vision_cfg")) != _eps(text, "text_cfg"):
        raise ConversionError("OpenCLIP towers with different layer norm eps are not supported")
    legacy = POOLING[text["pool_type"]]
    sizes = [vision[k] if isinstance(vision[k], int) else tuple(vision[k]) for k in ("image_size", "patch_size")]
    if any(isinstance(s, tuple) and len(set(s)) > 1 for s in sizes):
        raise ConversionError(f"only square images and patches are supported, not {sizes}")
    image_size, patch_size = (s if isinstance(s, int) else s[0] for s in sizes)
    if vision["width"] % vision["head_width"]:
        raise ConversionError(f"vision width {vision['width']} is not a multiple of head_width {vision['head_width']}")
    try:
        return CLIPDims(
            embed_dim=model_cfg["embed_dim"],
            image_size=image_size,
            patch_size=patch_size,
            vision_width=vision["width"],
            vision_layers=vision["layers"],
            vision_heads=vision["width"] // vision["head_width"],
            vision_mlp=int(vision["width"] * vision["mlp_ratio"]),
            context_length=text["context_length"],
            vocab_size=text["vocab_size"],
            text_width=text["width"],
            text_layers=text["layers"],
            text_heads=text["heads"],
            text_mlp=int(text["width"] * text["mlp_ratio"]),
            # argmax pooling (at OpenAI's EOT, the highest id) is transformers' legacy rule, which it keys on id 2
            eos_token_id=HF_LEGACY_EOS_ID if legacy else text["eos_id"],
            activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
            layer_norm_eps=eps,
            legacy_eos_pooling=legacy,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"unsupported OpenCLIP config: {e!r}") from None


def preprocess_from_openclip(config: dict, dims: CLIPDims) -> dict:
    """preprocess_cfg -> the store's `preprocess` (image.preprocess arguments). open_clip sizes the transform by the
    model's image size, whatever the config's `size` says."""
    config = {k: v for k, v in config.items() if v is not None}
    mode, interpolation = config.get("resize_mode", "shortest"), config.get("interpolation", "bicubic")
    if mode not in RESIZE or interpolation not in INTERPOLATION:
        raise ConversionError(
            f"OpenCLIP preprocessing resize_mode={mode!r}, interpolation={interpolation!r} is not supported "
            f"(resize_mode {' or '.join(RESIZE)}; interpolation {', '.join(INTERPOLATION)})"
        )
    if config.get("mode", "RGB") != "RGB":
        raise ConversionError(f"OpenCLIP preprocessing mode {config['mode']!r} is not supported (only RGB)")
    mean, std = (config.get(k, default) for k, default in (("mean", OPENAI_CLIP_MEAN), ("std", OPENAI_CLIP_STD)))
    mean, std = ([float(v)] * 3 if isinstance(v, int | float) else [float(x) for x in v] for v in (mean, std))
    return dict(
        size=dims.image_size,
        crop_size=dims.image_size,
        mean=mean,
        std=std,
        resize=RESIZE[mode],
        resample=INTERPOLATION[interpolation],
        crop_rounding="round",
    )


def _open_clip_tensors(src: Path) -> dict[str, Tensor]:
    tensors = checkpoint.hf_tensors(src, names=WEIGHTS)
    for key in (k for k in tensors if k.removeprefix("text.") in TRANSPOSED):
        tensors[key] = tensors[key].t()
    if "logit_scale" in tensors and math.prod(tensors["logit_scale"].shape) == 1:
        tensors["logit_scale"] = tensors["logit_scale"].reshape(())  # nonscalar_logit_scale saves it as (1,)
    return tensors


def convert(src: Path) -> StoredModel:
    """An OpenCLIP checkpoint directory -> a CLIP StoredModel."""
    src = Path(src)
    config = checkpoint.read_json(src / CONFIG)
    if "model_cfg" not in config:
        raise ConversionError(f"{src / CONFIG} has no model_cfg")
    dims = dims_from_openclip(config["model_cfg"])
    text = "text." if config["model_cfg"].get("custom_text") else ""
    shapes = checkpoint.expected_shapes(lambda: CLIP(dims))
    tensors = checkpoint.remap(src, key_table(dims, text), _open_clip_tensors(src), shapes, ignored=IGNORED)
    preprocess = preprocess_from_openclip(config.get("preprocess_cfg") or {}, dims)
    return StoredModel("clip", asdict(dims), tensors, preprocess, openai_bpe())
