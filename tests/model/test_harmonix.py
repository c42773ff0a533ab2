"""Real songs: Harmonix-format segment files, audio and feature files, the label mapping, the
feature cache, bad files, and synthetic songs on real section timelines.

Audio tests write small WAV/FLAC files of pure tones, one pitch per section type, so every frame's
loudest mel band says which section it came from and alignment can be checked frame by frame.
The Harmonix Set tests read ../shared/data/harmonix (skipped where it is absent).
"""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from model import audio, harmonix
from model import data as data_mod
from model.audio import FeatureParams
from model.config import ConfigError, DataError, TrainConfig
from model.data import make_data
from model.harmonix import HarmonixWarning, parse_segments
from model.train import train

SHARED_SEGMENTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "harmonix" / "segments"
needs_shared = pytest.mark.skipif(not SHARED_SEGMENTS.is_dir(),
                                  reason=f"Harmonix Set segments not found at {SHARED_SEGMENTS}")

SR, HOP, N_FFT, N_MELS = 8000, 200, 256, 16  # mel frames at 40 per second
TONES = {"intro": 250.0, "verse": 500.0, "chorus": 2400.0}  # Hz; chorus far above the others


@pytest.fixture(autouse=True)
def _fresh_cache():
    data_mod.clear_cache()
    yield
    data_mod.clear_cache()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def caught(fn, *args, **kwargs):
    """Call fn; return (result, [warning messages])."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(x.message) for x in w if issubclass(x.category, HarmonixWarning)]


# --------------------------------------------------------------------------- segment files
def test_parse_clean_file(tmp_path):
    p = write(tmp_path / "song.txt", "0.5 intro\n2.0 verse\n6.1 chorus\n10.3 end\n")
    seg, msgs = caught(parse_segments, p)
    assert msgs == []
    assert [(s.label, s.start, s.end, s.line) for s in seg.sections] == [
        ("intro", 0.5, 2.0, 1), ("verse", 2.0, 6.1, 2), ("chorus", 6.1, 10.3, 3)]
    assert seg.end == 10.3 and seg.open_section is None and seg.track == "song"
    assert seg.annotated_s == pytest.approx(9.8)


@pytest.mark.parametrize("text, line, words, sections", [
    # a doubled `end`: the annotation ends at the first
    ("0 verse\n5 chorus\n9 end\n12 end\n", 4, "second 'end'",
     [("verse", 0, 5), ("chorus", 5, 9)]),
    # lines after `end`
    ("0 verse\n5 end\n7 chorus\n", 3, "lines after 'end'", [("verse", 0, 5)]),
    # no `end`: the last section stays open
    ("0 verse\n5 chorus\n", 2, "no 'end' line", [("verse", 0, 5)]),
    # unsorted times are sorted
    ("0 intro\n8 chorus\n3 verse\n12 end\n", 3, "sorted by time",
     [("intro", 0, 3), ("verse", 3, 8), ("chorus", 8, 12)]),
    # a duplicated line: the first copy has zero length
    ("0 verse\n4 chorus\n4 chorus\n9 end\n", 2, "repeats it",
     [("verse", 0, 4), ("chorus", 4, 9)]),
    # two labels at one time: the first has zero length
    ("0 verse\n4 prechorus\n4 chorus\n9 end\n", 2, "zero length",
     [("verse", 0, 4), ("chorus", 4, 9)]),
    # a section that starts at `end`
    ("0 verse\n4 chorus\n9 outro\n9 end\n", 3, "zero length",
     [("verse", 0, 4), ("chorus", 4, 9)]),
])
def test_quirks_warn_with_file_and_line(tmp_path, text, line, words, sections):
    p = write(tmp_path / "quirky.txt", text)
    seg, msgs = caught(parse_segments, p)
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith(f"{p} line {line}:") and words in msgs[0]
    assert [(s.label, s.start, s.end) for s in seg.sections] == sections
    if "no 'end'" in words:
        assert seg.open_section.label == "chorus" and seg.open_section.start == 5


@pytest.mark.parametrize("text, named", [
    ("0 verse\nabc chorus\n9 end\n", "line 2: time 'abc' is not a number"),
    ("0 verse\n5\n9 end\n", "line 2: expected 'time label'"),
    ("0 verse\n-3 chorus\n9 end\n", "line 2: time must be a number >= 0"),
    ("0 verse\nnan chorus\n9 end\n", "line 2: time must be a number >= 0"),
    ("0 verse\n4 123\n9 end\n", "line 2: label '123' has no letters"),
    ("", "no 'time label' lines"),
    ("0 end\n", "no section before 'end'"),
])
def test_unreadable_files_raise_naming_file_and_line(tmp_path, text, named):
    p = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError) as e:
        parse_segments(p)
    assert str(e.value).startswith(str(p)) and named in str(e.value)


def test_binary_and_missing_files_raise(tmp_path):
    p = tmp_path / "binary.txt"
    p.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(DataError, match="binary.txt: cannot read"):
        parse_segments(p)
    with pytest.raises(DataError, match="nope.txt: no such file"):
        parse_segments(tmp_path / "nope.txt")


def test_numbered_labels_and_label_mapping(tmp_path):
    """chorus2, Chorus_3 -> chorus; prechorus and postchorus are not chorus by default; a
    chorus-like label outside chorus_labels is reported; the mapping is configurable."""
    write(tmp_path / "a.txt", "0 intro\n2 verse1\n4 PreChorus\n5 chorus2\n7 postchorus\n8 Chorus_3\n"
                              "10 end\n")
    write(tmp_path / "b.txt", "0 verse\n2 backchorus\n4 refrain\n6 end\n")
    segs, msgs = caught(harmonix.read_segments_dir, tmp_path)
    a = segs[0]
    assert [s.label for s in a.sections] == ["intro", "verse", "prechorus", "chorus",
                                             "postchorus", "chorus"]
    assert len(msgs) == 2
    assert "3 labels in 1 files" in msgs[0] and f"{tmp_path / 'a.txt'} line 2: 'verse1' -> 'verse'" in msgs[0]
    assert msgs[1] == (f"{tmp_path / 'b.txt'}: line 2 'backchorus': named like a chorus but not in "
                       f"chorus_labels; counted as non-chorus")
    # chorus share of annotated time: (2 + 2) of 10 s in a.txt, 2 of 6 s (refrain) in b.txt
    assert harmonix.chorus_share(segs) == pytest.approx(6 / 16)
    assert harmonix.chorus_share(segs, ("chorus", "postchorus")) == pytest.approx(5 / 16)
    y = harmonix.frame_labels([(s.label, s.start, s.end) for s in a.sections], 40, 4.0)
    assert y.tolist() == [0] * 20 + [1] * 8 + [0] * 4 + [1] * 8
    y = harmonix.frame_labels([(s.label, s.start, s.end) for s in a.sections], 40, 4.0,
                              ("chorus", "postchorus"))
    assert y.tolist() == [0] * 20 + [1] * 20


def test_chorus_labels_field_coerces_and_round_trips():
    cfg = TrainConfig.from_overrides({"chorus_labels": "chorus, postchorus"})
    assert cfg.chorus_labels == ("chorus", "postchorus")
    assert TrainConfig.from_overrides({"chorus_labels": ["chorus"]}).chorus_labels == ("chorus",)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["chorus_labels"] == ["chorus", "postchorus"]
    assert TrainConfig.from_overrides(d) == cfg
    for bad in ("", [], [3]):
        with pytest.raises(ConfigError, match="chorus_labels"):
            TrainConfig.from_overrides({"chorus_labels": bad})


def test_data_fields_must_match_the_source():
    with pytest.raises(ConfigError, match="data_dir: data_source harmonix reads songs from data_dir"):
        TrainConfig.from_overrides({"data_source": "harmonix"})
    with pytest.raises(ConfigError, match="data_dir: only read by data_source harmonix"):
        TrainConfig.from_overrides({"data_dir": "/x"})
    with pytest.raises(ConfigError, match="structures: only for data_source synthetic"):
        TrainConfig.from_overrides({"data_source": "harmonix", "data_dir": "/x", "structures": "/y"})
    with pytest.raises(ConfigError, match="hop_length: .* must be >= frame_rate"):
        TrainConfig.from_overrides({"data_source": "harmonix", "data_dir": "/x", "hop_length": 8000,
                                    "sample_rate": 8000})


def test_bad_paths_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"data_dir: no such directory: '{tmp_path}/nope'"):
        make_data(TrainConfig(data_source="harmonix", data_dir=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="has no segments/ directory"):
        make_data(TrainConfig(data_source="harmonix", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=f"{tmp_path}/forms: no such directory"):
        make_data(TrainConfig(structures=str(tmp_path / "forms")))


# ----------------------------------------------------------------------- the Harmonix Set
@needs_shared
def test_harmonix_set_all_912_files():
    """All 912 files parse; chorus share of annotated time is within the published 35-39 %; the
    real quirks (4 doubled `end`, 2 missing `end`, numbered labels) are reported by file and line."""
    segs, msgs = caught(harmonix.read_segments_dir, SHARED_SEGMENTS)
    assert len(segs) == 912
    share = harmonix.chorus_share(segs)
    assert 0.35 <= share <= 0.39
    assert share == pytest.approx(0.354, abs=0.002)  # postchorus as non-chorus (module docstring)
    with_post = harmonix.chorus_share(segs, harmonix.DEFAULT_CHORUS_LABELS + ("postchorus",))
    assert with_post == pytest.approx(0.387, abs=0.002)
    doubled = {"0287_therewasatime", "0292_timeslikethese", "0318_windup", "0653_dynamite"}
    no_end = {"0539_youandi", "0603_breaktheicejasonnevinsmix"}
    assert {Path(m.split(" line ")[0]).stem for m in msgs if "second 'end'" in m} == doubled
    assert {Path(m.split(" line ")[0]).stem for m in msgs if "no 'end' line" in m} == no_end
    numbered = [m for m in msgs if "carry a number" in m]
    assert len(numbered) == 1 and "0010_andjusticeforall.txt line 14: 'solo2' -> 'solo'" in numbered[0]
    assert len(msgs) == 4 + 2 + 1  # and nothing else: no unmapped chorus-like label
    by_track = {s.track: s for s in segs}
    assert by_track["0653_dynamite"].end == pytest.approx(308.306344)
    assert by_track["0539_youandi"].open_section.label == "outro"
    assert sum(s.annotated_s for s in segs) / 3600 == pytest.approx(54.65, abs=0.05)


@needs_shared
def test_synthetic_on_real_structures_follows_the_timelines():
    cfg = TrainConfig(structures=str(SHARED_SEGMENTS), n_songs=12, n_features=8, device="cpu")
    d, _ = caught(make_data, cfg)
    songs = d.train + d.val
    assert len(songs) == 12 and len(d.val) == 3
    for s in songs:
        seg, _ = caught(parse_segments, SHARED_SEGMENTS / f"{s.song_id}.txt")
        t0 = seg.sections[0].start
        assert len(s.labels) == round((seg.sections[-1].end - t0) * 4.0)
        chorus_s = sum(x.end - x.start for x in seg.sections
                       if x.label in harmonix.chorus_set(harmonix.DEFAULT_CHORUS_LABELS))
        assert abs(s.labels.sum() / 4.0 - chorus_s) <= 0.25 * len(seg.sections)
    again, _ = caught(data_mod._on_structures.__wrapped__, str(SHARED_SEGMENTS), 12, 0, 8, 4.0,
                      0.25, harmonix.DEFAULT_CHORUS_LABELS, False)
    assert [s.song_id for s in again.train] == [s.song_id for s in d.train]
    np.testing.assert_array_equal(again.train[0].features, d.train[0].features)


# ------------------------------------------------------------------- synthetic structures
def test_structures_from_a_directory(tmp_path):
    forms = tmp_path / "forms"
    write(forms / "a.txt", "1.5 intro\n3.5 verse\n13.5 chorus\n23.5 outro\n27.5 end\n")
    write(forms / "b.txt", "0 verse\n10 prechorus\n14 chorus\n24 postchorus\n28 end\n")
    write(forms / "c.txt", "0 verse2\n10 altchorus\n20 inst\n30 end\n")
    cfg = TrainConfig(structures=str(forms), n_songs=3, n_features=8, device="cpu")
    d, msgs = caught(make_data, cfg)
    by_id = {s.song_id: s for s in d.train + d.val}
    assert set(by_id) == {"a", "b", "c"}
    # lead-in cut: song a starts at its first boundary (1.5 s); chorus frames where chorus is
    assert by_id["a"].labels.tolist() == [0] * 48 + [1] * 40 + [0] * 16
    assert by_id["b"].labels.tolist() == [0] * 56 + [1] * 40 + [0] * 16  # pre/post: non-chorus
    assert by_id["c"].labels.tolist() == [0] * 40 + [1] * 40 + [0] * 40
    assert [x[0] for x in by_id["c"].sections] == ["verse", "chorus", "bridge"]
    post, msgs = caught(make_data, TrainConfig(structures=str(forms), n_songs=3, n_features=8,
                                               device="cpu", chorus_labels=("chorus", "postchorus")))
    assert any("c.txt: line 2 'altchorus': named like a chorus but not in chorus_labels" in m
               for m in msgs)
    b = {s.song_id: s for s in post.train + post.val}["b"]
    assert b.labels.tolist() == [0] * 56 + [1] * 56
    with pytest.raises(ConfigError, match="n_songs: 4 asked for, but structures .* has 3 usable"):
        caught(make_data, TrainConfig(structures=str(forms), n_songs=4, device="cpu"))


def test_structures_accepts_a_data_root(tmp_path):
    """structures may name a data root: its segments/ are used (audio or not)."""
    for name in ("a", "b"):
        write(tmp_path / "segments" / f"{name}.txt", "0 verse\n10 chorus\n20 end\n")
    write(tmp_path / "segments" / ".hidden.txt", "not a segment file")
    d = make_data(TrainConfig(structures=str(tmp_path), n_songs=2, device="cpu"))
    assert sorted(s.song_id for s in d.train + d.val) == ["a", "b"]


def test_bad_structure_file_stops_unless_skipped(tmp_path):
    forms = tmp_path / "forms"
    write(forms / "a.txt", "0 verse\n10 chorus\n20 end\n")
    write(forms / "b.txt", "0 verse\n10 chorus\n20 end\n")
    write(forms / "c.txt", "0 verse\nten chorus\n20 end\n")
    with pytest.raises(DataError, match=r"c.txt line 2: .* \(set skip_bad_tracks: true"):
        make_data(TrainConfig(structures=str(forms), n_songs=2, device="cpu"))
    d, msgs = caught(make_data, TrainConfig(structures=str(forms), n_songs=2, device="cpu",
                                            skip_bad_tracks=True))
    assert {s.song_id for s in d.train + d.val} == {"a", "b"}
    assert any("c.txt line 2" in m and "left out (skip_bad_tracks)" in m for m in msgs)


# ------------------------------------------------------------------------- audio and frames
# (section, start, end): a lead-in of silence, then sections whose boundaries are off the grid
FORM_A = [("intro", 0.6, 2.3), ("verse", 2.3, 6.1), ("chorus", 6.1, 10.35), ("verse", 10.35, 13.0),
          ("chorus", 13.0, 17.2)]
FORM_B = [("verse", 0.0, 3.7), ("chorus", 3.7, 8.05), ("verse", 8.05, 12.4), ("chorus", 12.4, 16.0)]


def tone_audio(form, total_s: float, seed: int = 0) -> np.ndarray:
    """One pure tone per section type (silence before the first section), a little noise."""
    t = np.arange(int(total_s * SR)) / SR
    y = np.random.default_rng(seed).normal(0, 1e-3, len(t))
    for label, a, b in form:
        on = (t >= a) & (t < b)
        y[on] += 0.5 * np.sin(2 * np.pi * TONES[label] * t[on])
    return y.astype(np.float32)


def segment_text(form, end: float) -> str:
    return "".join(f"{a} {label}\n" for label, a, _ in form) + f"{end} end\n"


def make_root(tmp_path: Path, n_tracks: int = 4) -> Path:
    """A data root with n tracks alternating WAV / FLAC and forms A / B; audio runs 0.4 s past `end`."""
    import soundfile as sf

    root = tmp_path / "songs"
    for i in range(n_tracks):
        form = FORM_A if i % 2 == 0 else FORM_B
        end = form[-1][2]
        write(root / "segments" / f"t{i}.txt", segment_text(form, end))
        (root / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(root / "audio" / f"t{i}.{'wav' if i < 2 else 'flac'}", tone_audio(form, end + 0.4, i),
                 SR)
    return root


def audio_cfg(root: Path, tmp_path: Path, **kw) -> TrainConfig:
    base = dict(data_source="harmonix", data_dir=str(root), cache_dir=str(tmp_path / "cache"),
                sample_rate=SR, hop_length=HOP, n_fft=N_FFT, n_features=N_MELS, device="cpu")
    return TrainConfig(**{**base, **kw})


def chorus_band_share(x: np.ndarray) -> np.ndarray:
    """Per frame: is the loudest band a chorus-tone band (above 1.2 kHz)? x: [T, n_mels] dB."""
    import librosa

    centres = librosa.mel_frequencies(n_mels=N_MELS + 2, fmax=SR / 2)[1:-1]
    return centres[x.argmax(axis=1)] > 1200


def section_at(form, t: float) -> str | None:
    return next((lab for lab, a, b in form if a <= t < b), None)


@pytest.mark.parametrize("frame_rate", [40.0, 4.0, 3.0])
def test_audio_frames_line_up_with_the_annotation(tmp_path, frame_rate):
    """WAV and FLAC -> log-mel -> labels: frame i is at t_i = i / frame_rate, the count of frames
    is the annotation's (t_i < end, the audio's extra tail cut), and every frame whose window
    lies inside one section has that section's tone and label. At 40 frames/s (no pooling) a
    frame's window is the STFT's own: centred, so frames 32 ms from a boundary are already pure."""
    root = make_root(tmp_path)
    d = make_data(audio_cfg(root, tmp_path, frame_rate=frame_rate))
    assert d.frame_rate == frame_rate and d.n_features == N_MELS
    songs = {s.song_id: s for s in d.train + d.val}
    assert set(songs) == {"t0", "t1", "t2", "t3"} and len(d.val) == 1
    half = N_FFT / 2 / SR if frame_rate == SR / HOP else 0.5 / frame_rate + N_FFT / 2 / SR
    for track, song in songs.items():
        form = FORM_A if track in ("t0", "t2") else FORM_B
        end = form[-1][2]
        assert song.features.shape == (math.ceil(end * frame_rate), N_MELS)
        t = np.arange(len(song.labels)) / frame_rate
        expect = np.array([section_at(form, ti) == "chorus" for ti in t])
        np.testing.assert_array_equal(song.labels, expect.astype(np.int64))
        bounds = np.array([a for _, a, _ in form] + [end])
        pure = np.abs(t[:, None] - bounds[None, :]).min(axis=1) > half + 1e-9
        pure &= t >= form[0][1]
        assert pure.sum() > 0.6 * len(t)
        high = chorus_band_share(song.features)
        np.testing.assert_array_equal(high[pure], expect[pure], err_msg=track)


def test_frame_times_are_window_centres():
    """Frame i stands for t_i = i / frame_rate. Without pooling (40 frames/s) a click at 3.0 s is
    loudest in frame 120 (the STFT frames are centred, padding included); pooled to 4 frames/s, a
    tone burst inside [t_8 - 0.125, t_8 + 0.125) (by more than half an FFT window) lands in frame
    8 alone."""
    t = np.arange(6 * SR) / SR
    click = np.random.default_rng(0).normal(0, 1e-4, len(t)).astype(np.float32)
    click[3 * SR] = 1.0
    x = audio.log_mel(click, FeatureParams(40.0, N_MELS, SR, N_FFT, HOP))  # [T, F] dB
    assert x.shape[0] == 1 + len(t) // HOP and x.mean(axis=1).argmax() == 120
    burst = np.where((t >= 1.9) & (t < 2.1), 0.5 * np.sin(2 * np.pi * 2400 * t), 0.0)
    x = audio.log_mel(burst.astype(np.float32), FeatureParams(4.0, N_MELS, SR, N_FFT, HOP))
    band = x.max(axis=0).argmax()  # the burst's band, dB per frame:
    assert x[:, band].argmax() == 8 and x[8, band] - max(x[7, band], x[9, band]) > 30


def test_audio_to_a_short_train(tmp_path):
    """decode -> features -> labels -> train(): a few steps run and report a finite F1."""
    root = make_root(tmp_path)
    cfg = audio_cfg(root, tmp_path, frames=32, batch_size=4, epochs=1, steps_per_epoch=4,
                    hidden_dim=8, n_blocks=1, val_fraction=0.5)
    res = train(cfg)
    assert res.steps == 4 and res.status in ("converged", "collapsed")
    assert math.isfinite(res.final_val_loss) and 0 <= res.final_val_f1 <= 1


def test_features_are_cached_by_content_and_params(tmp_path, monkeypatch):
    root = make_root(tmp_path, n_tracks=2)
    cfg = audio_cfg(root, tmp_path, frame_rate=4.0)
    first = make_data(cfg)
    cached = sorted((tmp_path / "cache" / "features").glob("*.npy"))
    assert [p.name.split("-")[0] for p in cached] == ["t0", "t1"]
    assert np.load(cached[0]).shape[0] == N_MELS  # stored as [n_mels, frames], like features/

    calls = []
    real = audio.log_mel
    monkeypatch.setattr(audio, "log_mel", lambda *a: calls.append(a) or real(*a))
    data_mod.clear_cache()
    second = make_data(cfg)
    assert calls == []  # the second run reads the cache
    for a, b in zip(first.train + first.val, second.train + second.val):
        np.testing.assert_array_equal(a.features, b.features)

    data_mod.clear_cache()
    make_data(audio_cfg(root, tmp_path, frame_rate=4.0, hop_length=100))  # other params
    assert len(calls) == 2
    import soundfile as sf

    sf.write(root / "audio" / "t0.wav", tone_audio(FORM_A, 17.6, seed=9), SR)  # other content
    data_mod.clear_cache()
    make_data(cfg)
    assert len(calls) == 3


@pytest.mark.parametrize("damage, named", [
    ("truncate_wav", "t1.wav: truncated"),
    ("garbage_flac", "t2.flac: cannot decode"),
    ("truncate_flac", "t2.flac: cannot decode"),
    ("truncate_mp3", "t1.mp3: .* s of audio, but .*t1.txt annotates up to 16.00 s"),
])
def test_bad_audio_names_the_file_and_stops_unless_skipped(tmp_path, damage, named):
    import soundfile as sf

    root = make_root(tmp_path)
    if damage == "truncate_wav":
        p = root / "audio" / "t1.wav"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "garbage_flac":
        (root / "audio" / "t2.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)
    elif damage == "truncate_flac":
        p = root / "audio" / "t2.flac"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:  # an MP3 cut in half: caught against its annotation (16 s annotated)
        (root / "audio" / "t1.wav").unlink()
        sf.write(root / "audio" / "t1.mp3", tone_audio(FORM_B, 16.4), SR)
        p = root / "audio" / "t1.mp3"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError, match=named) as e:
        make_data(audio_cfg(root, tmp_path))
    assert "skip_bad_tracks: true" in str(e.value)
    d, msgs = caught(make_data, audio_cfg(root, tmp_path, skip_bad_tracks=True))
    assert len(d.train + d.val) == 3
    assert any(named.split(":")[0] in m and "left out (skip_bad_tracks)" in m for m in msgs)


def test_unpaired_tracks_are_reported(tmp_path):
    root = make_root(tmp_path, n_tracks=3)
    write(root / "segments" / "lonely.txt", "0 verse\n5 end\n")
    (root / "audio" / "t0.wav").rename(root / "audio" / "orphan.wav")
    d, msgs = caught(make_data, audio_cfg(root, tmp_path))
    assert {s.song_id for s in d.train + d.val} == {"t1", "t2"}
    assert any("2 tracks have segments but no features" in m and "lonely, t0" in m for m in msgs)
    assert any("1 feature or audio files have no segments" in m and "orphan" in m for m in msgs)
    (root / "audio" / "t1.wav").unlink()
    (root / "audio" / "t2.flac").unlink()
    data_mod.clear_cache()
    with pytest.raises(DataError, match="has no track with both"):
        caught(make_data, audio_cfg(root, tmp_path))


def test_audio_without_end_line_runs_to_the_audio_end(tmp_path):
    root = make_root(tmp_path, n_tracks=2)
    write(root / "segments" / "t1.txt", segment_text(FORM_B, 0).rsplit("0 end", 1)[0])
    d, msgs = caught(make_data, audio_cfg(root, tmp_path, frame_rate=4.0))
    t1 = {s.song_id: s for s in d.train + d.val}["t1"]
    assert any("t1.txt line 4: no 'end' line" in m for m in msgs)
    n = len(t1.labels)
    assert n == pytest.approx(16.4 * 4, abs=2)  # the whole audio
    assert t1.labels[-1] == 1 and t1.sections[-1][0] == "chorus"


# --------------------------------------------------------------------------- feature files
def test_feature_files_with_and_without_sidecar(tmp_path):
    """features/<track>.npy [n_mels, frames]: at frame_rate, or averaged down from the rate in
    the sidecar JSON; frames are cut at `end` and labelled at t_i = i / frame_rate."""
    root = tmp_path / "songs"
    for i in range(2):
        write(root / "segments" / f"f{i}.txt", "0 verse\n2.1 chorus\n5 end\n")
    fine = np.tile(np.arange(210) / 40.0, (N_MELS, 1)).astype(np.float32)  # value = its time
    (root / "features").mkdir()
    np.save(root / "features" / "f0.npy", fine)
    write(root / "features" / "f0.json", json.dumps({"sample_rate": 8000, "hop_length": 200}))
    np.save(root / "features" / "f1.npy", fine[:, :30])  # at frame_rate itself (4/s): 7.5 s
    d = make_data(TrainConfig(data_source="harmonix", data_dir=str(root), n_features=N_MELS,
                              device="cpu"))
    songs = {s.song_id: s for s in d.train + d.val}
    f0, f1 = songs["f0"], songs["f1"]
    assert f0.features.shape == (20, N_MELS) and f1.features.shape == (20, N_MELS)
    # pooled frame i averages the fine frames in [t_i - 0.125, t_i + 0.125): mean time = t_i
    # (frame 0 only has the right half of its window)
    np.testing.assert_allclose(f0.features[1:, 0], np.arange(1, 20) / 4.0 - 0.0125, atol=1e-6)
    assert f0.labels.tolist() == [0] * 9 + [1] * 11  # t_9 = 2.25 >= 2.1
    np.testing.assert_array_equal(f1.features, fine[:, :20].T)


@pytest.mark.parametrize("matrix, named", [
    (np.zeros((8, 50), np.float32), "8 bands, but n_features is 16; set n_features: 8"),
    (np.zeros((50, 16), np.float32), "looks transposed"),
    (np.zeros(50, np.float32), "expected a log-mel matrix"),
    (np.full((16, 50), np.nan, np.float32), "non-finite values (first at band 0, frame 0)"),
])
def test_bad_feature_files_name_the_file(tmp_path, matrix, named):
    root = tmp_path / "songs"
    for i in range(3):
        write(root / "segments" / f"f{i}.txt", "0 verse\n2 chorus\n5 end\n")
        (root / "features").mkdir(exist_ok=True)
        np.save(root / "features" / f"f{i}.npy", np.zeros((N_MELS, 20), np.float32))
    np.save(root / "features" / "f1.npy", matrix)
    cfg = TrainConfig(data_source="harmonix", data_dir=str(root), n_features=N_MELS, device="cpu")
    with pytest.raises(DataError, match="f1.npy: ") as e:
        make_data(cfg)
    assert named in str(e.value)


def test_pool_frames_convention():
    x = np.arange(12, dtype=np.float32)[:, None]  # 12 frames at 3/s, value = index
    np.testing.assert_allclose(audio.pool_frames(x, 3.0, 1.0)[:, 0], [0.5, 3.0, 6.0, 9.0, 11.0])
    assert audio.pool_frames(x, 4.0, 4.0) is x
    with pytest.raises(DataError, match="cannot feed frame_rate 8"):
        audio.pool_frames(x, 4.0, 8.0, "here")
