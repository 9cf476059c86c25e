"""tokenizer.json for vocabularies that ship without one, and for models this project trains: CLIP's byte-level BPE.

OpenAI's CLIP tokenizer, as transformers' CLIPTokenizerFast builds it: NFC, whitespace folded, lowercased, split
into words, byte-level symbols with the end-of-word suffix `</w>`, BOS/EOS around every text. RoBERTa's (CLAP's
text tower), as transformers' RobertaTokenizer builds it: byte-level BPE on the raw text, <s> ... </s> around it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from .errors import ConversionError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI's merges as OpenAI and open_clip ship them (MIT, see its LICENSE file): one "#version" line, then merges
OPENAI_BPE = Path(__file__).parent / "bundled" / "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MERGES = 49152 - 256 - 2  # the merges OpenAI's SimpleTokenizer reads: 49408 tokens in all
# RoBERTa's special tokens by tokenizer_config key, for a config that names none
ROBERTA_SPECIALS = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def _clip_pipeline(model: BPE) -> Tokenizer:
    """The normaliser, pre-tokeniser and decoder of transformers' CLIPTokenizer around a BPE model."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> str:
    """A CLIP BPE vocabulary (holding BOS and EOS) -> tokenizer.json text, as transformers' CLIPTokenizer builds it."""
    if BOS not in vocab or EOS not in vocab:
        raise ConversionError(f"the vocabulary has no {BOS} / {EOS} tokens")
    model = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS)
    tokenizer = _clip_pipeline(model)
    tokenizer.add_special_tokens([BOS, EOS])
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False
    )
    return tokenizer.to_str()


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> str:
    """A CLIP-style byte-level BPE tokenizer with at most `vocab_size` tokens, trained on `texts` -> tokenizer.json text.

    Laid out like OpenAI's: the 256 byte symbols, the same with the end-of-word suffix, one token
    per merge, then BOS and EOS (so EOS has the highest id).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # code-point order = OpenAI's byte order
    base = alphabet + [c + "</w>" for c in alphabet]
    if vocab_size <= len(base) + 2:
        raise ValueError(f"vocab_size must exceed {len(base) + 2} (the byte symbols and BOS/EOS)")
    tokenizer = _clip_pipeline(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    trainer = BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    merges = [tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]][: vocab_size - len(base) - 2]
    tokens = list(dict.fromkeys(base + ["".join(m) for m in merges])) + [BOS, EOS]
    return clip_bpe({t: i for i, t in enumerate(tokens)}, merges)


def openai_bpe() -> str:
    """OpenAI's CLIP vocabulary, which OpenCLIP's CLIP models use and OpenCLIP directories do not carry ->
    tokenizer.json text. Ids as OpenAI's SimpleTokenizer numbers them (its special tokens, named differently there,
    are BOS 49406 and EOS 49407), so they equal transformers' for openai/clip-vit-*."""
    lines = gzip.decompress(OPENAI_BPE.read_bytes()).decode("utf-8").split("\n")[1 : OPENAI_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # code-point order = OpenAI's byte order
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    return clip_bpe({t: i for i, t in enumerate(tokens)}, merges)


def roberta_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], tokenizer_config: dict) -> str:
    """A RoBERTa vocab.json + merges.txt -> tokenizer.json text, as transformers' RobertaTokenizer builds it."""
    specials = {}
    for key, default in ROBERTA_SPECIALS.items():
        token = tokenizer_config.get(key) or default
        specials[key] = token if isinstance(token, dict) else {"content": token}
    missing = [s["content"] for s in specials.values() if s["content"] not in vocab]
    if missing:
        raise ConversionError(f"the vocabulary has no {', '.join(missing)}")
    prefix = bool(tokenizer_config.get("add_prefix_space", False))
    tokenizer = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tokenizer.decoder = decoders.ByteLevel()
    bos, eos = specials["bos_token"]["content"], specials["eos_token"]["content"]
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]),
        (bos, vocab[bos]),
        trim_offsets=bool(tokenizer_config.get("trim_offsets", True)),
        add_prefix_space=prefix,
    )
    tokenizer.add_special_tokens(
        [
            AddedToken(
                s["content"],
                lstrip=s.get("lstrip", False),
                rstrip=s.get("rstrip", False),
                normalized=False,
                special=True,
            )
            for s in sorted(specials.values(), key=lambda s: vocab[s["content"]])
        ]
    )
    return tokenizer.to_str()
