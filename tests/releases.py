"""Checkpoint directories laid out as the releases of SigLIP and OpenCLIP are, with seeded random weights, for the
parity tests (tests/encoders) and the job tests (tests/jobs). References only: transformers and open_clip."""

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

CONTEXT = 24  # the OpenCLIP test models' text positions

CAPTIONS = [
    f"a photo of a {c} {t} {p}"
    for c, t, p in itertools.product(
        ["red", "green", "blue", "yellow", "purple", "black", "white", "grey"],
        ["circle", "square", "star", "cat", "dog", "horse", "car", "house", "tree", "boat"],
        ["on a table", "in the snow", "at the beach", "in a forest", "next to a window", "in the city"],
    )
]


def train_spiece(directory: Path) -> Path:
    """A unigram SentencePiece model laid out as T5's (pad 0, EOS 1, unk 2, no BOS), as SigLIP's spiece.model is."""
    import sentencepiece

    prefix = directory / "spiece"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS + ["The quick brown fox jumps over the lazy dog."]),
        model_prefix=str(prefix),
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def hf_siglip(vocab: int, image_size=30, patch=10, act="gelu_pytorch_tanh", vision=(40, 2, 4, 68), text=(36, 2, 3, 72)):
    """A transformers SiglipModel with random weights: HF's init plus noise, so that no bias is 0 and no LN is 1."""
    width, layers, heads, mlp = vision
    vision_config = dict(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp, hidden_act=act
    )
    twidth, layers, heads, mlp = text
    text_config = dict(
        hidden_size=twidth,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        hidden_act=act,
        vocab_size=vocab,
        max_position_embeddings=16,
        projection_size=width,
    )
    config = SiglipConfig(
        text_config=text_config, vision_config=vision_config | dict(image_size=image_size, patch_size=patch)
    )
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def save_release(model: SiglipModel, path: Path, tokenizer: Path, resample: int = 3) -> Path:
    """`model` saved as a SigLIP release: spiece.model through SiglipTokenizer, or the Gemma tokenizer files."""
    model.save_pretrained(path)
    length = model.config.text_config.max_position_embeddings
    if tokenizer.suffix == ".model":
        SiglipTokenizer(str(tokenizer), model_max_length=length).save_pretrained(path)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).write_text((tokenizer / name).read_text())
    size = model.config.vision_config.image_size
    SiglipImageProcessorPil(size={"height": size, "width": size}, resample=resample).save_pretrained(path)
    return path


def model_cfg(image_size=28, patch=7, quick_gelu=True, **text) -> dict:
    return dict(
        embed_dim=24,
        quick_gelu=quick_gelu,
        vision_cfg=dict(image_size=image_size, patch_size=patch, width=48, layers=2, head_width=16, mlp_ratio=2.5),
        text_cfg=dict(context_length=CONTEXT, vocab_size=49408, width=40, heads=5, layers=2) | text,
    )


def write_openclip(open_clip, path: Path, cfg: dict, preprocess_cfg: dict, weights="open_clip_model.safetensors"):
    """An OpenCLIP directory as open_clip's save_for_hf writes it, with a seeded random model (noise on every weight,
    so no bias is 0 and no LN is 1); -> the open_clip model."""
    cfg = json.loads(json.dumps(cfg))
    cls = open_clip.model.CustomTextCLIP if cfg.get("custom_text") else open_clip.model.CLIP
    torch.manual_seed(0)
    model = cls(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if weights.endswith(".safetensors"):
        save_file(state, path / weights)
    else:
        torch.save(state, path / weights)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}))
    return model
