"""HTSAT, CLAP's audio tower: a Swin transformer over the log-mel spectrogram folded into a square image.

As transformers' `ClapAudioEncoder` runs it: batch norm over mel bins, the (frames, n_mels) input
stretched (bicubic) to `spec_size * r` frames and folded into `r` bands stacked along frequency
(`r = spec_size // n_mels`), patch embedding, stages of windowed attention with relative position
bias (every other block's windows shifted by half a window, masked where the roll wraps), patch
merging between stages, then the mean of the last stage's tokens. The fused variant adds the
attentional feature fusion of a long clip's three local chunks into its whole-clip patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import ACTIVATIONS, Attention, Block, LayerNorm, Linear, normal

SHIFT_MASK = -100.0  # what Swin adds to the scores of a pair of tokens the shift brought together


@dataclass(frozen=True)
class HTSATDims:
    n_mels: int
    spec_size: int  # side of the square image the spectrogram is folded into
    patch_size: list[int]  # (frequency, time) of the patch convolution
    patch_stride: list[int]
    width: int  # of the first stage; each merge doubles it
    depths: list[int]  # blocks per stage
    heads: list[int]  # per stage
    window: int
    mlp_ratio: float
    activation: str
    layer_norm_eps: float  # of the blocks' norms (the others keep nn.LayerNorm's 1e-5, as transformers builds them)
    patch_norm: bool = True
    fusion: bool = False
    fusion_width: int = 0  # the fusion's bottleneck channels

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.spec_size % self.n_mels:
            # transformers stretches a spectrogram with fewer bins than a band back to its own frame count: it fails
            raise ValueError(f"spec_size {self.spec_size} is not a multiple of n_mels {self.n_mels}")
        if len(self.depths) != len(self.heads) or any(w % h for w, h in zip(self.widths, self.heads)):
            raise ValueError(f"stage widths {self.widths} are not multiples of heads {self.heads}")
        (kh, kw), (sh, sw) = self.patch_size, self.patch_stride
        grid = [(self.spec_size + 2 * ((k - s) // 2) - k) // s + 1 for k, s in ((kh, sh), (kw, sw))]
        if grid != [self.spec_size // sh, self.spec_size // sw] or grid[0] != grid[1]:
            raise ValueError(f"patch size {self.patch_size} / stride {self.patch_stride} give no square grid")
        if any(side < self.window for side in self.resolutions):
            # transformers attends over a stage smaller than the window with the window's bias table: it fails
            raise ValueError(
                f"stages of {self.resolutions} tokens a side: one is smaller than the window {self.window}"
            )
        if grid[0] % 2 ** (len(self.depths) - 1):
            raise ValueError(f"a {grid[0]}x{grid[0]} grid does not halve evenly over {len(self.depths)} stages")
        if self.resolutions[-1] % (self.spec_size // self.n_mels):
            # transformers regroups the last stage's rows into the r bands before its mean: it fails
            raise ValueError(f"the last stage's {self.resolutions[-1]} rows do not split into the mel bands")

    @property
    def widths(self) -> list[int]:
        return [self.width * 2**i for i in range(len(self.depths))]

    @property
    def resolutions(self) -> list[int]:
        """The side of each stage's square of tokens."""
        return [self.spec_size // self.patch_stride[0] // 2**i for i in range(len(self.depths))]

    @property
    def out_width(self) -> int:
        return self.widths[-1]


class BatchNorm(nn.Module):
    """Batch norm at inference (running statistics) over dim 1, with nn.BatchNorm*'s tensor names."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, channels, ...) -> the same, normalised in fp32 and cast back."""
        stats = (t.float() for t in (self.running_mean, self.running_var, self.weight, self.bias))
        return F.batch_norm(x.float(), *stats, False, 0.0, self.eps).type(x.dtype)


class Fusion(nn.Module):
    """Attentional feature fusion (2-D): a per-pixel mix of global and local patches, weighted by a local
    and a global (pooled) branch."""

    def __init__(self, width: int, inner: int):
        super().__init__()

        def branch(*pool: nn.Module) -> nn.Sequential:
            convs = (nn.Conv2d(width, inner, 1), BatchNorm(inner), nn.ReLU(), nn.Conv2d(inner, width, 1))
            return nn.Sequential(*pool, *convs, BatchNorm(width))

        self.local_att = branch()
        self.global_att = branch(nn.AdaptiveAvgPool2d(1))

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """x, residual: (batch, width, h, w) -> (batch, width, h, w)."""
        both = x + residual
        weight = torch.sigmoid(self.local_att(both) + self.global_att(both))
        return 2 * x * weight + 2 * residual * (1 - weight)


class PatchEmbed(nn.Module):
    def __init__(self, dims: HTSATDims):
        super().__init__()
        (kh, kw), (sh, sw) = dims.patch_size, dims.patch_stride
        padding = ((kh - sh) // 2, (kw - sw) // 2)
        self.proj = nn.Conv2d(1, dims.width, (kh, kw), (sh, sw), padding)
        self.norm = LayerNorm(dims.width) if dims.patch_norm else nn.Identity()
        if dims.fusion:
            self.fusion_model = Fusion(dims.width, dims.fusion_width)
            # a local chunk is a third of the time axis: a kernel and stride three times as wide
            self.mel_conv2d = nn.Conv2d(1, dims.width, (kh, 3 * kw), (sh, 3 * sw), padding)

    def forward(self, image: Tensor, longer: Tensor | None = None) -> Tensor:
        """image: (batch, channels, spec_size, spec_size), longer: (batch,) bool (fused) -> (batch, grid², width)."""
        x = self.proj(image[:, :1])
        if longer is not None and bool(longer.any()):
            # channels 1-3 of a long clip: its three chunks, side by side along time after their convolution
            local = image[longer, 1:]
            b, c, h, w = local.shape
            local = self.mel_conv2d(local.reshape(b * c, 1, h, w))
            local = local.view(b, c, *local.shape[1:]).permute(0, 2, 3, 1, 4).flatten(3)
            local = F.pad(local, (0, x.shape[-1] - local.shape[-1]))
            x = x.clone()
            x[longer] = self.fusion_model(x[longer], local)
        return self.norm(x.flatten(2).transpose(1, 2))


class WindowAttention(Attention):
    """Attention within windows: x (batch, windows, tokens, width), the mask (windows, heads, tokens, tokens) added
    to the scores. Windows and heads share one axis, so the mask broadcasts over the batch without a copy and
    SDPA keeps its fused CPU kernel (which takes 4-D inputs only)."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, t, w = x.shape
        q, k, v = self.qkv(x).view(b, n, t, 3, self.heads, w // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = (z.reshape(b, n * self.heads, t, -1) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.reshape(1, n * self.heads, t, t))
        return self.out(y.view(b, n, self.heads, t, -1).transpose(2, 3).reshape(b, n, t, w))


@lru_cache(maxsize=16)
@torch.inference_mode(False)  # cached: a tensor made under inference mode could not serve a forward outside it
def relative_position_index(window: int) -> Tensor:
    """(window², window²): the bias-table row of each pair of tokens in a window, by their offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offset = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return offset[:, :, 0] * (2 * window - 1) + offset[:, :, 1]


@lru_cache(maxsize=16)
@torch.inference_mode(False)
def shift_mask(side: int, window: int, shift: int) -> Tensor:
    """(windows, window², window²) float: SHIFT_MASK between tokens the cyclic shift made neighbours, else 0."""
    index = torch.arange(side)
    region = (index >= side - window).long() + (index >= side - shift).long()  # three bands along each axis
    labels = (region[:, None] * 3 + region[None, :]).float()
    labels = labels.view(side // window, window, side // window, window).transpose(1, 2).reshape(-1, window * window)
    return torch.where(labels[:, None, :] != labels[:, :, None], SHIFT_MASK, 0.0)


class SwinBlock(Block):
    """A pre-LN block whose attention runs within windows of `window`² tokens, shifted by `shift`."""

    def __init__(self, width: int, heads: int, hidden: int, activation: str, eps: float, window: int, shift: int):
        super().__init__(width, heads, hidden, activation, norm_first=True, eps=eps)
        self.attn = WindowAttention(width, heads)
        self.window, self.shift = window, shift
        self.relative_position_bias_table = normal((2 * window - 1) ** 2, heads, std=0.02)

    def forward(self, x: Tensor, side: int) -> Tensor:
        """x: (batch, side², width) -> (batch, side², width)."""
        b, _, c = x.shape
        w, shift = self.window, self.shift
        padded = side + (-side) % w  # padded with zeros after the norm, as transformers does
        h = F.pad(self.ln1(x).view(b, side, side, c), (0, 0, 0, padded - side, 0, padded - side))
        if shift:
            h = torch.roll(h, (-shift, -shift), (1, 2))
        n = padded // w
        windows = h.view(b, n, w, n, w, c).transpose(2, 3).reshape(b, n * n, w * w, c)
        index = relative_position_index(w).to(x.device)
        mask = self.relative_position_bias_table[index].permute(2, 0, 1).expand(n * n, -1, -1, -1)
        if shift:
            mask = mask + shift_mask(padded, w, shift).to(x.device, mask.dtype)[:, None]
        h = self.attn(windows, mask).view(b, n, n, w, w, c).transpose(2, 3).reshape(b, padded, padded, c)
        if shift:
            h = torch.roll(h, (shift, shift), (1, 2))
        x = x + h[:, :side, :side].reshape(b, side * side, c)
        return x + self.mlp(self.ln2(x))


class PatchMerging(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = LayerNorm(4 * width)
        self.reduction = Linear(4 * width, 2 * width, bias=False)

    def forward(self, x: Tensor, side: int) -> Tensor:
        """x: (batch, side², width) -> (batch, (side / 2)², 2 width): each 2x2 patch into one token."""
        b, _, c = x.shape
        x = x.view(b, side, side, c)
        # transformers' order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
        x = torch.cat([x[:, row::2, col::2] for col in range(2) for row in range(2)], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class Stage(nn.Module):
    def __init__(self, dims: HTSATDims, i: int):
        super().__init__()
        width, side = dims.widths[i], dims.resolutions[i]
        # a stage no larger than the window attends over all of it, unshifted
        window, shift = (side, 0) if side <= dims.window else (dims.window, dims.window // 2)
        self.side = side
        self.blocks = nn.ModuleList(
            SwinBlock(
                width,
                dims.heads[i],
                int(dims.mlp_ratio * width),
                dims.activation,
                dims.layer_norm_eps,
                window,
                shift if j % 2 else 0,
            )
            for j in range(dims.depths[i])
        )
        self.downsample = PatchMerging(width) if i < len(dims.depths) - 1 else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, self.side)
        return x if self.downsample is None else self.downsample(x, self.side)


class HTSAT(nn.Module):
    def __init__(self, dims: HTSATDims):
        super().__init__()
        self.dims = dims
        self.batch_norm = BatchNorm(dims.n_mels)
        self.patch_embed = PatchEmbed(dims)
        self.layers = nn.ModuleList(Stage(dims, i) for i in range(len(dims.depths)))
        self.norm = LayerNorm(dims.out_width)

    def fold(self, mel: Tensor) -> Tensor:
        """mel: (batch, channels, frames, n_mels) -> (batch, channels, spec_size, spec_size), as transformers'
        reshape_mel2img: time stretched to spec_size * r frames, cut into r bands stacked along frequency."""
        ratio = self.dims.spec_size // self.dims.n_mels
        width = self.dims.spec_size * ratio
        b, c, frames, bins = mel.shape
        if frames > width:
            raise ValueError(f"{frames} mel frames exceed the {width} the model folds")
        if frames < width:
            mel = F.interpolate(mel, (width, bins), mode="bicubic", align_corners=True)
        mel = mel.reshape(b, c * ratio, width // ratio, bins).permute(0, 1, 3, 2)
        return mel.reshape(b, c, bins * ratio, width // ratio)

    def forward(self, mel: Tensor, longer: Tensor | None = None) -> Tensor:
        """mel: (batch, channels, frames, n_mels) (4 channels fused, else 1), longer: (batch,) bool (fused)
        -> (batch, out_width): the mean of the last stage's normed tokens (transformers' pooler_output)."""
        dtype = self.patch_embed.proj.weight.dtype
        # the norm and the bicubic stretch in fp32: CPU bicubic has no fp16 kernel
        x = self.batch_norm(mel.float().transpose(1, 3)).transpose(1, 3)
        x = self.patch_embed(self.fold(x).to(dtype), longer)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).mean(dim=1)
