"""CLAP: an HTSAT audio tower and a RoBERTa text tower projected into one space, so a sentence finds a sound.

As transformers' `ClapModel` runs LAION's `clap-htsat-unfused` / `clap-htsat-fused`: the audio
tower's pooled output (htsat.py) and the text tower's pooler (tanh of a dense layer over the
first token of a post-LN RoBERTa, bert.py's `Bert`) each go through a two-layer projection (ReLU
between). Audio inputs come from clap_audio.py; a clip longer than 10 s is, unfused, the mean of
its 10 s windows' L2-normalised embeddings (fused, one input, see clap_audio.py). Zero-shot scores
are transformers' `logits_per_audio`: exp(logit_scale_a) times the cosine, softmaxed over labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint, clap_audio
from .bert import Bert, BertDims, hf_table
from .block import ACTIVATIONS, Linear
from .checkpoint import Table
from .errors import ConversionError, ModelLoadError
from .htsat import HTSAT, BatchNorm, HTSATDims
from .model import TOWERS, Encoder, Item, softmax_scores
from .options import Options
from .text import TextTokenizer
from .vocab import roberta_bpe
from .weights import StoredModel, load_state

TEXT_CHUNK = 64  # texts per forward pass, sorted by length first so each chunk pads little
AUDIO_CHUNK = 16  # 10 s windows per forward pass
PROJECTION_ACTIVATIONS = {"relu": F.relu} | ACTIVATIONS


@dataclass(frozen=True)
class ClapDims:
    embed_dim: int
    projection_activation: str
    audio: HTSATDims
    text: BertDims

    def __post_init__(self):
        if self.projection_activation not in PROJECTION_ACTIVATIONS:
            raise ValueError(f"projection activation {self.projection_activation!r} is not supported")


def dims_from_config(config: dict) -> ClapDims:
    """A store's config (asdict of ClapDims) -> ClapDims."""
    return ClapDims(
        config["embed_dim"], config["projection_activation"], HTSATDims(**config["audio"]), BertDims(**config["text"])
    )


class Projection(nn.Module):
    def __init__(self, width: int, embed_dim: int, activation: str):
        super().__init__()
        self.linear1 = Linear(width, embed_dim)
        self.linear2 = Linear(embed_dim, embed_dim)
        self.act = PROJECTION_ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.act(self.linear1(x)))


class CLAP(nn.Module):
    def __init__(self, dims: ClapDims):
        super().__init__()
        self.dims = dims
        self.audio = HTSAT(dims.audio)
        self.audio_projection = Projection(dims.audio.out_width, dims.embed_dim, dims.projection_activation)
        self.text = Bert(dims.text)
        self.text_pooler = Linear(dims.text.width, dims.text.width)
        self.text_projection = Projection(dims.text.width, dims.embed_dim, dims.projection_activation)
        # transformers scales audio->text logits by exp(logit_scale_a), text->audio by exp(logit_scale_t)
        self.logit_scale_a = nn.Parameter(torch.zeros(()))
        self.logit_scale_t = nn.Parameter(torch.zeros(()))

    def encode_audio(self, mel: Tensor, longer: Tensor | None = None) -> Tensor:
        """mel: (batch, 1 or 4 fused, frames, n_mels), longer: (batch,) bool (fused) -> unnormalised (batch, embed_dim)."""
        return self.audio_projection(self.audio(mel, longer))

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (batch, seq), right-padded -> unnormalised (batch, embed_dim)."""
        first = self.text(ids, mask)[:, 0]
        return self.text_projection(torch.tanh(self.text_pooler(first)))


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast for reduced-precision compute, all but the norms: they compute in fp32 from fp32 tensors, never rounded
    (in bf16 the mel batch norm's mean of about -40 dB would move by up to 0.125)."""
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, BatchNorm)):
            continue
        for name, p in m.named_parameters(recurse=False):
            setattr(m, name, nn.Parameter(p.to(dtype), requires_grad=False))
    return model


class ClapEncoder(Encoder):
    modalities = TOWERS["clap"]

    def __init__(self, name: str, stored: StoredModel, options: Options = Options()):
        super().__init__(name, stored, options)
        try:
            self.dims = dims_from_config(stored.config)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{name}: not a valid CLAP config: {e}") from None
        if stored.tokenizer is None:
            raise ModelLoadError(f"{name}: the CLAP store has no tokenizer")
        self.device = options.torch_device
        self.tokenizer = TextTokenizer(stored.tokenizer, self.dims.text.max_seq_length, self.dims.text.pad_id)

    def build(self, stored: StoredModel) -> nn.Module:
        with torch.device("meta"):  # no random init: every weight comes from the store
            model = CLAP(self.dims)
        load_state(model, stored, self.name, assign=True)
        return _cast(model, self.options.torch_dtype).to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.dims.embed_dim

    @property
    def logit_scale(self) -> float:
        """What zero-shot classification of audio multiplies cosines by before its softmax over labels."""
        return float(self.model.logit_scale_a.float().exp())

    def score(self, cosines: np.ndarray) -> np.ndarray:
        """Zero-shot: a softmax over the labels of exp(logit_scale_a) · cos, as ClapModel's `logits_per_audio`."""
        return softmax_scores(cosines, self.logit_scale)

    def embed(self, modality: str, items: Sequence[Item]) -> np.ndarray:
        self.check_modality(modality)
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            if modality == "text":
                return self._embed_texts(list(items))
            if self.dims.audio.fusion:
                return self._embed_fused(items)
            return self._embed_windows(items)

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(order), TEXT_CHUNK):
            chunk = order[start : start + TEXT_CHUNK]
            ids, mask = (torch.from_numpy(a).to(self.device) for a in self.tokenizer([texts[i] for i in chunk]))
            out[chunk] = self.model.encode_text(ids, mask).float().cpu()
        return self.finish(out)

    def _embed_windows(self, items: Sequence[Item]) -> np.ndarray:
        """Unfused: every item's 10 s windows in one stream of batches, then each item's mean of unit vectors."""
        windows = torch.from_numpy(np.concatenate(list(items)))
        out = torch.cat(
            [
                F.normalize(self.model.encode_audio(self._mel(windows[i : i + AUDIO_CHUNK, None])).float(), dim=-1)
                for i in range(0, len(windows), AUDIO_CHUNK)
            ]
        ).cpu()
        return self.finish(torch.stack([part.mean(0) for part in out.split([len(item) for item in items])]))

    def _embed_fused(self, items: Sequence[Item]) -> np.ndarray:
        """Fused: a clip of at most 10 s is its one mel in all four channels; a longer one has four of its own."""
        out = []
        for start in range(0, len(items), AUDIO_CHUNK):
            chunk = items[start : start + AUDIO_CHUNK]
            longer = torch.tensor([len(item) == clap_audio.FUSION_CHANNELS for item in chunk], device=self.device)
            mel = torch.stack([torch.from_numpy(item).expand(clap_audio.FUSION_CHANNELS, -1, -1) for item in chunk])
            out.append(self.model.encode_audio(self._mel(mel), longer).float().cpu())
        return self.finish(torch.cat(out))

    def _mel(self, mel: Tensor) -> Tensor:
        return mel.to(self.device, self.options.torch_dtype)


# --- Hugging Face checkpoints ----------------------------------------------------------

AUDIO = "audio_model.audio_encoder."
# ours -> HF ClapModel; a tuple of several HF tensors is concatenated along dim 0 (q, k, v -> qkv)
SWIN_BLOCK_KEYS = {
    "attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn.out": ("attention.output.dense",),
    "ln1": ("layernorm_before",),
    "mlp.fc1": ("intermediate.dense",),
    "mlp.fc2": ("output.dense",),
    "ln2": ("layernorm_after",),
}
BATCH_NORM = ("weight", "bias", "running_mean", "running_var")
FUSION_MELS = 64  # transformers' fusion shrinks a long clip's mel to 64 bins, whatever the extractor makes
# the fusion's two branches: the positions of their convolutions and batch norms in transformers' nn.Sequential
FUSION_LAYERS = (("local_att", (0, 3), (1, 4)), ("global_att", (1, 4), (2, 5)))
# transformers' ClapConfig / ClapTextConfig / ClapAudioConfig / ClapFeatureExtractor defaults, for keys a
# saved config leaves out (save_pretrained writes only what differs from them)
HF_DEFAULTS = dict(projection_dim=512, projection_hidden_act="relu")
HF_TEXT_DEFAULTS = dict(
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-12,
    pad_token_id=1,
)
HF_AUDIO_DEFAULTS = dict(
    window_size=8,
    num_mel_bins=64,
    spec_size=256,
    hidden_act="gelu",
    patch_size=4,
    patch_stride=[4, 4],
    hidden_size=768,
    depths=[2, 2, 6, 2],
    num_attention_heads=[4, 8, 16, 32],
    enable_fusion=False,
    fusion_type=None,
    patch_embed_input_channels=1,
    flatten_patch_embeds=True,
    patch_embeds_hidden_size=96,
    enable_patch_layer_norm=True,
    qkv_bias=True,
    mlp_ratio=4.0,
    aff_block_r=4,
    layer_norm_eps=1e-5,
)
HF_FEATURE_DEFAULTS = dict(
    feature_size=64,
    sampling_rate=48_000,
    hop_length=480,
    max_length_s=10,
    fft_window_size=1024,
    frequency_min=0,
    frequency_max=14_000,
    truncation="fusion",
    padding="repeatpad",
)


def _pairs(keys: dict[str, tuple[str, ...]], ours: str, theirs: str) -> Table:
    """The weight and bias of each module in `keys` (ours -> theirs), under the two prefixes."""
    return {f"{ours}{k}.{p}": tuple(f"{theirs}{t}.{p}" for t in v) for k, v in keys.items() for p in ("weight", "bias")}


def key_table(dims: ClapDims) -> Table:
    """Every tensor of CLAP(dims) -> the HF ClapModel tensors it is made of."""
    a = dims.audio
    table = {"logit_scale_a": ("logit_scale_a",), "logit_scale_t": ("logit_scale_t",)}
    table |= {f"text.{k}": tuple(f"text_model.{t}" for t in v) for k, v in hf_table(dims.text).items()}
    heads = (
        "text_projection.linear1",
        "text_projection.linear2",
        "audio_projection.linear1",
        "audio_projection.linear2",
    )
    table |= _pairs({"text_pooler": ("text_model.pooler.dense",)} | {k: (k,) for k in heads}, "", "")
    # the audio tower keeps transformers' names (under AUDIO) outside its blocks
    same = [f"batch_norm.{p}" for p in BATCH_NORM] + ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    same += ["norm.weight", "norm.bias"] + (
        ["patch_embed.norm.weight", "patch_embed.norm.bias"] if a.patch_norm else []
    )
    if a.fusion:
        same += ["patch_embed.mel_conv2d.weight", "patch_embed.mel_conv2d.bias"]
        for branch, convs, norms in FUSION_LAYERS:
            same += [f"patch_embed.fusion_model.{branch}.{i}.{p}" for i in convs for p in ("weight", "bias")]
            same += [f"patch_embed.fusion_model.{branch}.{i}.{p}" for i in norms for p in BATCH_NORM]
    for i, depth in enumerate(a.depths):
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}."
            table |= _pairs(SWIN_BLOCK_KEYS, f"audio.{block}", f"{AUDIO}{block}")
            table[f"audio.{block}relative_position_bias_table"] = (
                f"{AUDIO}{block}attention.self.relative_position_bias_table",
            )
        if i < len(a.depths) - 1:
            same += [f"layers.{i}.downsample.{k}" for k in ("norm.weight", "norm.bias", "reduction.weight")]
    return table | {f"audio.{k}": (f"{AUDIO}{k}",) for k in same}


def ignored_keys(dims: ClapDims) -> tuple[str, ...]:
    """Checkpoint tensors the model recomputes or never reads: index buffers and batch-norm step counters."""
    blocks = [f"layers.{i}.blocks.{j}" for i, depth in enumerate(dims.audio.depths) for j in range(depth)]
    norms = ["batch_norm"] + [f"patch_embed.fusion_model.{b}.{i}" for b, _, ii in FUSION_LAYERS for i in ii]
    return (
        "text_model.embeddings.position_ids",
        "text_model.embeddings.token_type_ids",
        *(f"{AUDIO}{b}.attention.self.relative_position_index" for b in blocks),
        *(f"{AUDIO}{n}.num_batches_tracked" for n in norms),
    )


def _pair(value: int | Sequence[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def dims_from_hf(config: dict, tokenizer_config: dict) -> ClapDims:
    """A ClapModel config.json (and its tokenizer_config.json, for the text length) -> ClapDims."""
    top = HF_DEFAULTS | config
    audio = HF_AUDIO_DEFAULTS | (config.get("audio_config") or {})
    text = HF_TEXT_DEFAULTS | (config.get("text_config") or {})
    if audio["enable_fusion"] and audio["fusion_type"] not in (None, "aff_2d"):
        raise ConversionError(f"fusion_type {audio['fusion_type']!r} is not supported (only aff_2d)")
    unsupported = [
        k
        for k, v in (("qkv_bias", True), ("flatten_patch_embeds", True), ("patch_embed_input_channels", 1))
        if audio[k] != v
    ]
    if unsupported:
        raise ConversionError(f"audio_config {', '.join(f'{k}={audio[k]!r}' for k in unsupported)} is not supported")
    pad_id = text["pad_token_id"]
    positions = text["max_position_embeddings"]
    try:
        htsat = HTSATDims(
            n_mels=audio["num_mel_bins"],
            spec_size=audio["spec_size"],
            patch_size=_pair(audio["patch_size"]),
            patch_stride=_pair(audio["patch_stride"]),
            width=audio["patch_embeds_hidden_size"],
            depths=list(audio["depths"]),
            heads=list(audio["num_attention_heads"]),
            window=audio["window_size"],
            mlp_ratio=float(audio["mlp_ratio"]),
            activation=audio["hidden_act"],
            layer_norm_eps=audio["layer_norm_eps"],
            patch_norm=audio["enable_patch_layer_norm"],
            fusion=audio["enable_fusion"],
            fusion_width=int(audio["patch_embeds_hidden_size"] // audio["aff_block_r"])
            if audio["enable_fusion"]
            else 0,
        )
        if htsat.out_width != audio["hidden_size"]:
            raise ValueError(
                f"audio hidden_size {audio['hidden_size']} is not the last stage's width {htsat.out_width}"
            )
        bert = BertDims(
            vocab_size=text["vocab_size"],
            width=text["hidden_size"],
            layers=text["num_hidden_layers"],
            heads=text["num_attention_heads"],
            mlp=text["intermediate_size"],
            max_positions=positions,
            type_vocab_size=text["type_vocab_size"],
            layer_norm_eps=text["layer_norm_eps"],
            activation=text["hidden_act"],
            # what ClapProcessor's tokenizer would truncate to (it does not by default; past this it fails)
            max_seq_length=min(tokenizer_config.get("model_max_length") or positions, positions - pad_id - 1),
            pad_id=pad_id,
            position_offset=pad_id + 1,  # RoBERTa numbers positions from pad_id + 1
        )
        if bert.activation not in ACTIVATIONS:
            raise ValueError(f"text activation {bert.activation!r} is not supported")
        return ClapDims(top["projection_dim"], top["projection_hidden_act"], htsat, bert)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"unsupported CLAP config: {e}") from None


def preprocess_from_hf(config: dict, fusion: bool) -> dict:
    """A preprocessor_config.json -> the store's `preprocess` settings (those of clap_audio.features)."""
    c = HF_FEATURE_DEFAULTS | config
    if c["truncation"] not in ("rand_trunc", "fusion") or (c["truncation"] == "fusion") != fusion:
        raise ConversionError(
            f"truncation {c['truncation']!r} does not fit a {'fused' if fusion else 'unfused'} model "
            f"(fused: fusion, unfused: rand_trunc)"
        )
    if c["padding"] not in clap_audio.PADDINGS:
        raise ConversionError(f"padding {c['padding']!r} is not one of {', '.join(clap_audio.PADDINGS)}")
    return dict(
        sampling_rate=c["sampling_rate"],
        n_mels=c["feature_size"],
        n_fft=c["fft_window_size"],
        hop_length=c["hop_length"],
        max_samples=c["max_length_s"] * c["sampling_rate"],
        f_min=float(c["frequency_min"]),
        f_max=float(c["frequency_max"]),
        mel_scale="htk" if fusion else "slaney",
        padding=c["padding"],
        fusion=fusion,
    )


def check_features(settings: dict, dims: HTSATDims) -> None:
    """Raise ConversionError unless the audio tower folds the features: its mel bins, no more frames than it holds."""
    frames = settings["max_samples"] // settings["hop_length"] + 1
    most = dims.spec_size * (dims.spec_size // dims.n_mels)
    if dims.fusion and dims.n_mels != FUSION_MELS:
        raise ConversionError(f"a fused model needs {FUSION_MELS} mel bins, not {dims.n_mels}")
    if settings["n_mels"] != dims.n_mels or frames > most:
        raise ConversionError(
            f"the features ({frames} frames x {settings['n_mels']} mel bins) do not fit the audio tower "
            f"({dims.n_mels} mel bins, at most {most} frames)"
        )


def convert_hf(src: Path) -> StoredModel:
    """A Hugging Face ClapModel checkpoint directory -> a CLAP StoredModel."""
    src = Path(src)
    tokenizer_config = checkpoint.read_json_if(src / "tokenizer_config.json") or {}
    dims = dims_from_hf(checkpoint.read_json(src / "config.json"), tokenizer_config)
    preprocess = preprocess_from_hf(checkpoint.read_json_if(src / "preprocessor_config.json") or {}, dims.audio.fusion)
    check_features(preprocess, dims.audio)
    shapes = checkpoint.expected_shapes(lambda: CLAP(dims))
    tensors = checkpoint.remap(src, key_table(dims), checkpoint.hf_tensors(src), shapes, ignored=ignored_keys(dims))
    tokenizer = checkpoint.tokenizer_json(src, bpe=partial(roberta_bpe, tokenizer_config=tokenizer_config))
    return StoredModel("clap", asdict(dims), tensors, preprocess, tokenizer)
