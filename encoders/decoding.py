"""Greedy decoding with Whisper's text decoder, batched, by the rules of openai-whisper's `decoding.py`.

One call decodes one 30 s window per row of `states` (the encoder's output for those windows):

- the prompt is the start-of-transcript sequence (`SpecialTokens.prompt`): `<|startoftranscript|>`, then for a
  multilingual model the language and `<|transcribe|>`, then `<|notimestamps|>` unless timestamps are asked for;
- every step takes the most probable token after Whisper's logit filters, in openai's order: at the first step the
  blank and end-of-text are suppressed (`suppress_begin`), at every step the non-speech tokens (`suppress`), and in
  timestamp mode `ApplyTimestampRules` (below);
- a row ends at `<|endoftext|>`, after `n_ctx // 2` sampled tokens (224, openai's `sample_len` and the limit
  CTranslate2 derives from `max_length=448`), or when the repetition guard sees it loop. Finished rows leave the
  batch: their logits are no longer computed, and the cache drops them once half the rows it holds are done;
- the steps run on one CPU thread (`STEP_THREADS`, `_step_threads`); the prompt and the cross-attention keys and
  values, big matmuls, on all.

Timestamp rules (openai's `ApplyTimestampRules`): `<|notimestamps|>` is never sampled; the first token is a
timestamp no later than `MAX_INITIAL_TIMESTAMP`; timestamps come in pairs (after a closing timestamp the next token
is a timestamp or end-of-text; after a pair, text); timestamps never decrease, and a segment's end is later than its
start; and a timestamp is taken whenever the timestamps' total probability beats the likeliest text token's.
CTranslate2 differs in one case: it lets a segment end at its start time (faster-whisper then drops that text).

Repetition guard: a row ends when its text tokens (timestamps aside) end in `REPEAT_COPIES` or more copies of one
unit of `p` tokens covering at least `REPEAT_SPAN` tokens (4 copies of 8 tokens, 32 of 1 token), the loop a greedy
decoder falls into on noise and sometimes on speech. The copies after the first are dropped and `Decoded.looped`
is set. Speech said three times over decodes as it is (three voices reading one sentence in a row did); said
four times or more within a window, it keeps one copy. Below that the tokens stay identical to CTranslate2's,
and a batch is spared running a loop to the length limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .whisper_decoder import Cache, SpecialTokens, TextDecoder

MAX_INITIAL_TIMESTAMP = 1.0  # s: the latest first timestamp (openai's and faster-whisper's default)
TIME_PRECISION = 0.02  # s per timestamp token: 30 s over 1500 encoder positions
REPEAT_SPAN, REPEAT_COPIES = 32, 4  # the repetition guard (above)
STEP_THREADS = 1  # CPU threads of the decoding steps (below)


@dataclass(frozen=True)
class Decoded:
    tokens: list[int]  # the sampled tokens, without the prompt and the end-of-text
    avg_logprob: float  # the tokens' summed log-probability (with end-of-text's, if sampled) / (len(tokens) + 1)
    no_speech_prob: float  # P(<|nospeech|>) at the start-of-transcript position, before any filter
    looped: bool  # ended by the repetition guard


def detect_language(decoder: TextDecoder, states: Tensor, special: SpecialTokens) -> list[str]:
    """Each window's likeliest language: the language token most probable after <|startoftranscript|>."""
    codes, ids = list(special.languages), torch.tensor(list(special.languages.values()))
    sot = torch.full((states.shape[0], 1), special.sot, device=states.device)
    logits = decoder.logits(decoder(sot, Cache(decoder, states, 1), 0)[:, 0])
    return [codes[i] for i in logits[:, ids.to(logits.device)].argmax(-1).tolist()]


def greedy(
    decoder: TextDecoder, states: Tensor, prompt: list[int], special: SpecialTokens, timestamps: bool
) -> list[Decoded]:
    """states: (batch, n_audio, width), one window a row; prompt: `special.prompt(...)`, the same for every row.
    -> one `Decoded` per row. Run under torch.inference_mode()."""
    batch, device = states.shape[0], states.device
    sample_len = decoder.dims.n_ctx // 2
    cache = Cache(decoder, states, min(decoder.dims.n_ctx, len(prompt) + sample_len))
    hidden = decoder(torch.tensor([prompt] * batch, device=device), cache, 0)
    first = decoder.logits(hidden[:, [prompt.index(special.sot), len(prompt) - 1]])
    no_speech = first[:, 0].softmax(-1)[:, special.no_speech].tolist()
    logits = first[:, 1]

    rules = _Rules(special, timestamps, logits.shape[-1], device)
    sequences: list[list[int]] = [[] for _ in range(batch)]
    logprobs_of: list[list[float]] = [[] for _ in range(batch)]  # each sampled token's, end-of-text included
    looped = [False] * batch
    active = list(range(batch))  # rows still decoding
    held = list(range(batch))  # the rows the cache holds, in its order (active ones and finished ones)
    with _step_threads(device):
        for step in range(sample_len):
            logprobs = rules(logits, step, [sequences[r] for r in active]).log_softmax(-1)
            best = logprobs.argmax(-1)
            chosen = logprobs.gather(1, best[:, None])[:, 0].tolist()
            still = []
            for row, token, logprob in zip(active, best.tolist(), chosen):
                logprobs_of[row].append(logprob)
                if token == special.eot:
                    continue
                sequences[row].append(token)
                if (cut := _loop_start(sequences[row], special.eot)) is not None:
                    sequences[row], logprobs_of[row], looped[row] = sequences[row][:cut], logprobs_of[row][:cut], True
                else:
                    still.append((row, token))
            active = [row for row, _ in still]
            if not active or step == sample_len - 1:
                break
            if len(active) <= len(held) // 2:
                cache.keep(torch.tensor([held.index(r) for r in active], device=device))
                held = list(active)
            feed = dict(still)
            tokens = torch.tensor([[feed.get(r, special.eot)] for r in held], device=device)
            hidden = decoder(tokens, cache, len(prompt) + step)
            logits = decoder.logits(hidden[[held.index(r) for r in active], 0])
    return [
        Decoded(seq, sum(lp) / (len(seq) + 1), p, loop)
        for seq, lp, p, loop in zip(sequences, logprobs_of, no_speech, looped)
    ]


@contextmanager
def _step_threads(device: torch.device) -> Iterator[None]:
    """Run the decoding steps on `STEP_THREADS` CPU threads, then restore the count. A step is ~100 small ops, and
    each parallel one waits at a barrier for every thread: with 2 threads on 2 cores shared with other processes,
    16 windows' steps took 1.4-7x the wall time of 1 thread, at 2-3.7x its CPU time. The prompt, the cross-attention
    keys and values and the encoder keep every thread."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(min(before, STEP_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Rules:
    """Whisper's logit filters for one decoding step (the module docstring), applied in place."""

    def __init__(self, special: SpecialTokens, timestamps: bool, n_vocab: int, device: torch.device):
        self.special, self.timestamps = special, timestamps
        self.suppress = torch.tensor(special.suppress, dtype=torch.long, device=device)
        self.suppress_begin = torch.tensor(special.suppress_begin, dtype=torch.long, device=device)
        self.n_timestamps = n_vocab - special.timestamp_begin
        self.max_initial = round(MAX_INITIAL_TIMESTAMP / TIME_PRECISION)

    def __call__(self, logits: Tensor, step: int, sequences: list[list[int]]) -> Tensor:
        """logits: (rows, n_vocab) float32 of the next token of each of `sequences` (its sampled tokens)."""
        if step == 0:
            logits[:, self.suppress_begin] = -math.inf
        logits[:, self.suppress] = -math.inf
        if not self.timestamps:
            return logits
        begin, eot = self.special.timestamp_begin, self.special.eot
        logits[:, self.special.no_timestamps] = -math.inf
        if step == 0:
            logits[:, :begin] = -math.inf
            logits[:, begin + self.max_initial + 1 :] = -math.inf
            return logits
        for row, seq in enumerate(sequences):
            last_was_timestamp = seq[-1] >= begin
            penultimate_was_timestamp = len(seq) < 2 or seq[-2] >= begin
            if last_was_timestamp and penultimate_was_timestamp:  # a segment just closed: text or end next
                logits[row, begin:] = -math.inf
            elif last_was_timestamp:  # a segment's end: the next one's start, or the end
                logits[row, :eot] = -math.inf
            last = next((t for t in reversed(seq) if t >= begin), None)
            if last is not None:  # never earlier than the last timestamp, and no segment of zero length
                floor = last if last_was_timestamp and not penultimate_was_timestamp else last + 1
                logits[row, begin:floor] = -math.inf
        logprobs = logits.log_softmax(-1)
        timestamp = logprobs[:, begin:].logsumexp(-1) > logprobs[:, :begin].max(-1).values
        logits[timestamp, :begin] = -math.inf
        return logits


def _loop_start(seq: list[int], eot: int) -> int | None:
    """Where the copies after the first begin, when `seq`'s text tokens end in a loop (the guard above)."""
    where = [i for i, t in enumerate(seq) if t < eot]  # positions of the text tokens
    text = [seq[i] for i in where]
    for p in range(1, len(text) // REPEAT_COPIES + 1):
        copies = max(REPEAT_COPIES, math.ceil(REPEAT_SPAN / p))
        if copies * p <= len(text) and text[-1] == text[-1 - p] and text[-copies * p :] == text[-p:] * copies:
            return where[len(text) - (copies - 1) * p]
    return None
