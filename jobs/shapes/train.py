"""Train the bundled demo CLIP `shapes-clip` on synthetic captioned shapes, then evaluate it.

    python -m jobs.shapes.train --out encoders/bundled/shapes-clip.parquet

Every batch is rendered fresh (jobs.shapes.render, seeded) and goes through the same
`image.preprocess` that ClipEncoder applies at inference; PNG is lossless, so a rendered
image and its PNG bytes give identical pixels. The loss is CLIP's symmetric contrastive
loss, except that a caption counts as matching every image in the batch that fits all it
says ("a red circle" fits each red circle, whatever its size or place), not only its own.
The evaluation loads the saved store through the registry and uses held-out scenes from
seeds that training never sees; it prints the metrics and writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import queue
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from encoders import image, registry, weights
from encoders.clip import CLIP, CLIPDims
from encoders.model import Encoder
from encoders.text import TextTokenizer
from encoders.weights import StoredModel

from . import render as shapes

TRAIN_SEED = 0
EVAL_SEED = 1  # zero-shot and attribute accuracy
RETRIEVAL_SEED = 2

PREPROCESS = {
    "size": shapes.IMAGE_SIZE,
    "crop_size": shapes.IMAGE_SIZE,
    "mean": list(image.OPENAI_CLIP_MEAN),
    "std": list(image.OPENAI_CLIP_STD),
}


def default_dims(tokenizer_json: str) -> CLIPDims:
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    return CLIPDims(
        embed_dim=64,
        image_size=shapes.IMAGE_SIZE,
        patch_size=16,
        vision_width=128,
        vision_layers=4,
        vision_heads=4,
        vision_mlp=512,
        context_length=32,
        vocab_size=len(vocab),
        text_width=128,
        text_layers=1,
        text_heads=4,
        text_mlp=512,
        eos_token_id=vocab[shapes.EOS],
        activation="gelu",
    )


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1350
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    curriculum: float = 0.3  # share of the steps over which easy scenes (large, centred) give way to all scenes
    weight_decay: float = 0.05
    threads: int = 2
    seed: int = TRAIN_SEED


ATTRIBUTES = ("colour", "shape", "size", "position", "background")


def batch(
    rng: random.Random, n: int, tokenizer: TextTokenizer, easy: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> pixel_values (n, 3, 64, 64), input_ids and attention_mask (n, seq), and
    positives (n captions, n images) bool: the images that fit everything caption i says.

    easy: the share of scenes drawn large and in the centre.
    """
    scenes = [
        shapes.sample_scene(rng, size="large", position="center") if rng.random() < easy else shapes.sample_scene(rng)
        for _ in range(n)
    ]
    templates = [rng.choice(shapes.TEMPLATES) for _ in range(n)]
    captions = [shapes.fill(t, s, rng) for t, s in zip(templates, scenes)]
    pixels = np.stack([image.preprocess(shapes.render(s), **PREPROCESS) for s in scenes])
    ids, mask = tokenizer(captions)
    values = np.array([[getattr(s, a) for a in ATTRIBUTES] for s in scenes])
    stated = np.array([[a in shapes.mentioned(t) for a in ATTRIBUTES] for t in templates])
    positives = ((values[None, :, :] == values[:, None, :]) | ~stated[:, None, :]).all(-1)
    return torch.from_numpy(pixels), torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(positives)


def contrastive_loss(logits_per_text: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against the positives spread evenly (one per row = plain CLIP loss)."""
    p = positives.float()
    text_to_image = -(p / p.sum(1, keepdim=True) * logits_per_text.log_softmax(1)).sum(1).mean()
    image_to_text = -(p / p.sum(0, keepdim=True) * logits_per_text.log_softmax(0)).sum(0).mean()
    return (text_to_image + image_to_text) / 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, embeddings or the logit scale."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class _Monitor:
    """Zero-shot colour x shape accuracy on 5 held-out images per class, for the training log."""

    def __init__(self, tokenizer: TextTokenizer):
        rng = random.Random(EVAL_SEED)
        held_out = [shapes.sample_scene(rng, c, s) for c, s in shapes.CLASSES for _ in range(5)]
        self.pixels = torch.from_numpy(np.stack([image.preprocess(shapes.render(s), **PREPROCESS) for s in held_out]))
        self.ids, self.mask = map(
            torch.from_numpy, tokenizer([_prompt("a {colour} {shape}", colour=c, shape=s) for c, s in shapes.CLASSES])
        )
        self.truth = torch.tensor([shapes.CLASSES.index((s.colour, s.shape)) for s in held_out])

    @torch.no_grad()
    def __call__(self, model: CLIP) -> float:
        model.eval()
        images, texts = model.encode_image(self.pixels), model.encode_text(self.ids, self.mask)
        model.train()
        return ((images @ texts.t()).argmax(1) == self.truth).float().mean().item()


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) 2-D sine-cosine position codes, row-major like the patch sequence, with
    wavelengths from 2 patches to 4 grid widths, so that on a small grid neighbouring codes differ clearly."""
    quarter = width // 4
    freqs = math.pi * (2 * grid) ** (-torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    angles = [c.reshape(-1, 1) * freqs for c in (xs, ys)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def batches(config: TrainConfig, tokenizer: TextTokenizer) -> Iterator[tuple[torch.Tensor, ...]]:
    """Every training batch in order, each rendered in a thread while the model trains on the one before
    (the model's kernels release the GIL). Easy scenes (large, centred) give way to all scenes over the curriculum."""
    rng = random.Random(config.seed)
    ready: queue.Queue = queue.Queue(maxsize=2)

    def render() -> None:
        for step in range(config.steps):
            ready.put(
                batch(
                    rng, config.batch_size, tokenizer, max(0.0, 1 - step / max(1.0, config.curriculum * config.steps))
                )
            )

    threading.Thread(target=render, daemon=True).start()
    for _ in range(config.steps):
        yield ready.get()


def train(config: TrainConfig, dims: CLIPDims, tokenizer_json: str, log=print) -> CLIP:
    torch.manual_seed(config.seed)
    tokenizer = TextTokenizer(tokenizer_json, dims.context_length)
    model = CLIP(dims)
    with torch.no_grad():
        # patches start out knowing where they are: a ViT this small, trained this briefly, otherwise
        # learns colour, shape and size (bags of patches) but not position
        model.vision.positional_embedding[1:] = sincos_2d(dims.image_size // dims.patch_size, dims.vision_width)
    opt = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))
    )
    monitor = _Monitor(tokenizer)
    start = time.time()
    for step, (pixels, ids, mask, positives) in enumerate(batches(config, tokenizer)):
        logits_per_text = model(pixels, ids, mask).t()
        loss = contrastive_loss(logits_per_text, positives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == config.steps - 1:
            seen = f"  zero-shot {monitor(model):.3f}" if step % 250 == 0 or step == config.steps - 1 else ""
            log(
                f"step {step:5d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():5.1f}  {time.time() - start:6.0f} s{seen}"
            )
    return model.eval()


def stored_model(model: CLIP, tokenizer_json: str) -> StoredModel:
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return StoredModel("clip", asdict(model.dims), tensors, PREPROCESS, tokenizer_json)


# --- evaluation ------------------------------------------------------------------------


def _pngs(scenes: list[shapes.Scene]) -> list[bytes]:
    return [shapes.to_png(shapes.render(s)) for s in scenes]


def _prompt(template: str, **attributes: str) -> str:
    """The template's caption for these attributes (the scene's geometry plays no part in it)."""
    return shapes.fill(template, dataclasses.replace(shapes.scenes(0, 1)[0], **attributes))


def _argmax_accuracy(scores: np.ndarray, truth: np.ndarray) -> float:
    return float((scores.argmax(1) == truth).mean())


def evaluate(encoder: Encoder, per_class: int = 25, retrieval_n: int = 500) -> dict:
    """Zero-shot and attribute accuracy on `per_class` images of every colour x shape class,
    and text->image recall over `retrieval_n` images that differ in colour, shape, size or position."""
    rng = random.Random(EVAL_SEED)
    held_out = [shapes.sample_scene(rng, c, s) for c, s in shapes.CLASSES for _ in range(per_class)]
    images = encoder.encode("image", _pngs(held_out))

    class_prompts = encoder.encode(
        "text", [_prompt("a {colour} {shape}", colour=c, shape=s) for c, s in shapes.CLASSES]
    )
    class_truth = np.array([shapes.CLASSES.index((s.colour, s.shape)) for s in held_out])

    combos = [(c, s, z, p) for c, s in shapes.CLASSES for z in shapes.SIZES for p in shapes.POSITIONS]
    full_template = "a {size} {colour} {shape} {where}"
    full_prompts = encoder.encode(
        "text", [_prompt(full_template, colour=c, shape=s, size=z, position=p) for c, s, z, p in combos]
    )
    full_scores = images @ full_prompts.T
    full_truth = np.array([combos.index((s.colour, s.shape, s.size, s.position)) for s in held_out])
    # size and position: among the captions of the image's own colour and shape only
    own = np.array([[k for k, (c, s, _, _) in enumerate(combos) if (c, s) == (sc.colour, sc.shape)] for sc in held_out])
    own_scores = np.take_along_axis(full_scores, own, 1)
    picked = [combos[k] for k in np.take_along_axis(own, own_scores.argmax(1)[:, None], 1)[:, 0]]

    rng = random.Random(RETRIEVAL_SEED)
    distinct = rng.sample(combos, retrieval_n)
    scenes = [shapes.sample_scene(rng, c, s, z, p) for c, s, z, p in distinct]
    sims = (
        encoder.encode("text", [shapes.fill(full_template, sc) for sc in scenes])
        @ encoder.encode("image", _pngs(scenes)).T
    )
    rank = (sims > np.diag(sims)[:, None]).sum(1)  # images scored above the caption's own
    return {
        "zero_shot_colour_shape_accuracy": _argmax_accuracy(images @ class_prompts.T, class_truth),
        "classes": len(shapes.CLASSES),
        "images_per_class": per_class,
        "size_accuracy": float(np.mean([p[2] == s.size for p, s in zip(picked, held_out)])),
        "position_accuracy": float(np.mean([p[3] == s.position for p, s in zip(picked, held_out)])),
        "full_caption_accuracy": _argmax_accuracy(full_scores, full_truth),
        "full_caption_classes": len(combos),
        "text_to_image_recall_at_1": float((rank < 1).mean()),
        "text_to_image_recall_at_5": float((rank < 5).mean()),
        "retrieval_images": retrieval_n,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train shapes-clip, save it as a weight store, evaluate it.")
    parser.add_argument(
        "--out", type=Path, required=True, help="the weight store to write, e.g. encoders/bundled/shapes-clip.parquet"
    )
    parser.add_argument(
        "--metrics",
        type=Path,
        default=Path("out/shapes-clip-metrics.json"),
        help="where to write the metrics JSON (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    args = parser.parse_args(argv)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, threads=args.threads)
    torch.set_num_threads(config.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    tokenizer_json = shapes.build_tokenizer()
    dims = default_dims(tokenizer_json)
    model = train(config, dims, tokenizer_json, log)
    start = time.time()
    weights.save(stored_model(model, tokenizer_json), args.out)
    metrics = evaluate(registry.load_encoder(str(args.out)))
    metrics |= {"train": asdict(config), "dims": asdict(dims), "parameters": sum(p.numel() for p in model.parameters())}
    log(f"evaluated in {time.time() - start:.0f} s")
    text = json.dumps(metrics, indent=2)
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
