"""transformers `ClapModel` checkpoints with random weights, and our CLAP audio throughput against transformers'.

No CLAP weights can be downloaded here, so the tests and the bench build the reference from a
config: seeded random weights, with the norms, batch-norm statistics, relative position biases and
logit scales drawn away from their initial values (so a swapped or skipped tensor shows), a
RoBERTa-layout byte-level BPE vocabulary trained on a few captions, and the feature extractor's
settings. Not on the runtime import path: nothing a job runs imports this module.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encoders import clap_audio

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # RoBERTa's ids 0-3; <mask> takes the last id
CAPTIONS = (
    "a dog barking",
    "the sound of rain on a tin roof",
    "a cat meows loudly",
    "a man speaking",
    "birds singing in the morning",
    "a car engine starting",
    "Hello world, how are you?",
)
# LAION clap-htsat-unfused's audio tower (transformers' ClapAudioConfig defaults) and its extractor
LAION_AUDIO = dict(spec_size=256, num_mel_bins=64, patch_embeds_hidden_size=96, depths=[2, 2, 6, 2], hidden_size=768)
LAION_FEATURES = dict(feature_size=64, frequency_min=50, frequency_max=14_000, truncation="rand_trunc")
BENCH_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)  # not timed


def write_vocab(dest: Path, vocab_size: int = 320, texts: Sequence[str] = CAPTIONS) -> int:
    """A RoBERTa-layout vocab.json + merges.txt trained on `texts` -> the vocabulary's size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) * 20, trainer)
    tokenizer.model.save(str(dest))
    vocab = json.loads((dest / "vocab.json").read_text())
    vocab["<mask>"] = len(vocab)
    (dest / "vocab.json").write_text(json.dumps(vocab))
    return len(vocab)


def write_reference(
    dest: Path,
    audio_config: dict,
    text_config: dict,
    features: dict,
    projection_dim: int = 24,
    seed: int = 0,
    tokenizer_config: dict | None = None,
) -> Path:
    """A ClapModel checkpoint directory (safetensors, configs, vocab.json + merges.txt) with seeded random weights."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab_size = write_vocab(dest)
    torch.manual_seed(seed)
    config = ClapConfig(
        audio_config=audio_config,
        text_config={"vocab_size": vocab_size} | text_config,
        projection_dim=projection_dim,
    )
    model = ClapModel(config).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(-40 + 10 * torch.randn_like(t) if "batch_norm" in name else 0.3 * torch.randn_like(t))
            elif name.endswith("running_var"):
                t.copy_(torch.empty_like(t).uniform_(200, 500) if "batch_norm" in name else 0.5 + torch.rand_like(t))
            elif "relative_position_bias_table" in name or (t.is_floating_point() and name.endswith("bias")):
                t.copy_(0.3 * torch.randn_like(t))
            elif t.dim() == 1 and t.is_floating_point() and name.endswith("weight"):  # norms
                t.copy_(1 + 0.2 * torch.randn_like(t))
        model.logit_scale_a.fill_(math.log(12.0))
        model.logit_scale_t.fill_(math.log(40.0))  # distinct, so a test tells which one scores audio
    model.save_pretrained(dest)
    ClapFeatureExtractor(**features).save_pretrained(dest)
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "RobertaTokenizer", "model_max_length": 512} | (tokenizer_config or {}))
    )
    return dest


def bench_audio(
    clips: Sequence[bytes],
    src: Path | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """CLAP audio clips/s, ours (decode, features, `embed`) against transformers' (the same decoding, then
    `ClapFeatureExtractor` and `ClapModel.get_audio_features`), batch by batch over the same clips, after one
    warm-up batch each. `src`: a ClapModel checkpoint; None builds one with LAION's unfused audio tower (random
    weights). `min_cosine` compares the clips of at most 10 s (past that the reference crops at random)."""
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    from encoders.clap import ClapEncoder, convert_hf
    from encoders.options import Options

    with tempfile.TemporaryDirectory() as tmp:
        src = src or write_reference(Path(tmp) / "clap", LAION_AUDIO, BENCH_TEXT, LAION_FEATURES, projection_dim=512)
        encoder = ClapEncoder("clap-bench", convert_hf(src), Options(device=device, dtype=dtype))
        reference = ClapModel.from_pretrained(src).eval().to(device)
        extractor = ClapFeatureExtractor.from_pretrained(src)
    settings = encoder.stored.preprocess
    batches = [list(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)]

    def ours(batch: list[bytes]) -> np.ndarray:
        return encoder.embed("audio", [encoder.preprocess("audio", c) for c in batch])

    def theirs(batch: list[bytes]) -> np.ndarray:
        samples = [clap_audio.decode(c, settings) for c in batch]
        inputs = extractor(samples, sampling_rate=settings["sampling_rate"], return_tensors="pt").to(device)
        with torch.inference_mode():
            return reference.get_audio_features(**inputs).pooler_output.float().cpu().numpy()

    results = {"clips": len(clips), "batch_size": batch_size, "device": device, "dtype": dtype}
    outputs = {}
    for name, run in (("ours", ours), ("reference", theirs)):
        run(batches[0])
        start = time.perf_counter()
        outputs[name] = np.concatenate([run(b) for b in batches])
        seconds = time.perf_counter() - start
        results |= {f"seconds_{name}": seconds, f"clips_per_s_{name}": len(clips) / seconds}
    short = [i for i, c in enumerate(clips) if len(clap_audio.decode(c, settings)) <= settings["max_samples"]]
    a, b = outputs["ours"][short], outputs["reference"][short]
    cosines = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    results["speedup"] = results["clips_per_s_ours"] / results["clips_per_s_reference"]
    results["min_cosine"] = float(cosines.min()) if short else None
    return results
