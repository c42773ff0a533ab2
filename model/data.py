"""Songs for the chorus CNN: a synthetic pop-song generator (the embedded default), synthetic
songs on real section timelines (`structures`), real songs from files (`harmonix`, parsed in
model/harmonix.py, featurised in model/audio.py), the split by song, and batches of
fixed-length windows with padding masks.

Synthetic songs follow pop forms whose section lengths match the Harmonix Set (912 songs,
measured from its segment files: median chorus 20.2 s, verse 22.4 s, intro 13.2 s, pre-chorus
14.8 s, bridge 21.2 s, outro 15.0 s; chorus = 35.4 % of annotated time, counting postchorus as
non-chorus). The generated forms give chorus ~38.5 % of time (within the published 35-39 %),
medians chorus ~20.5 s and verse ~22.5 s. Features are 64
log-mel-like bands. Chorus differs from the rest only through cues that need context:
  * energy and brightness *relative to the song* (each song has its own loudness and timbre,
    whose spread is as large as the chorus lift, so one frame's level says little);
  * texture: a busier rhythm (frame-to-frame fluctuation in low and high bands) whose mean is
    zero, so a linear read-out of one frame cannot see it;
  * harmony: a chord progression per section type, random per song and repeated in every
    occurrence (a song-specific pattern: no single frame pattern means "chorus" across songs).
Everything is deterministic from the data seed. Synthetic feature units are bels (one unit =
10 dB: a song's bands span about 8 units, as log-mel bands of real music span about 80 dB), which
is what the `power` stress knob undoes (TrainConfig.features).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from model import harmonix
from model.audio import FeatureParams
from model.config import ConfigError, DataError, TrainConfig

# Median section lengths (seconds) in the Harmonix Set segment files.
MEDIAN_SECONDS = {"intro": 13.2, "verse": 22.4, "prechorus": 14.8, "chorus": 20.2,
                  "postchorus": 15.0, "bridge": 21.2, "outro": 15.0}
# Section energy (log units) relative to the verse, and brightness (spectral tilt) lift.
ENERGY = {"intro": -0.7, "verse": 0.0, "prechorus": 0.35, "chorus": 0.8, "postchorus": 0.5,
          "bridge": 0.2, "outro": -0.5}
BRIGHTNESS = {"intro": -0.2, "verse": 0.0, "prechorus": 0.25, "chorus": 0.6, "postchorus": 0.4,
              "bridge": 0.2, "outro": -0.2}
# Rhythmic busyness: std of the frame-to-frame fluctuation in the drum bands.
TEXTURE = {"intro": 0.15, "verse": 0.25, "prechorus": 0.35, "chorus": 0.7, "postchorus": 0.5,
           "bridge": 0.3, "outro": 0.15}
# Diatonic triads of a major key, as pitch classes relative to the key.
TRIADS = [(0, 4, 7), (2, 5, 9), (4, 7, 11), (5, 9, 0), (7, 11, 2), (9, 0, 4)]


@dataclass(frozen=True)
class Song:
    """One song: per-frame features [T, F], labels [T] (1 = chorus) and its sections."""

    song_id: str
    features: np.ndarray  # [T, F] float32
    labels: np.ndarray  # [T] int64
    sections: tuple[tuple[str, float, float], ...]  # (label, start_s, end_s)


@dataclass(frozen=True)
class SongData:
    """Songs split by song into train and validation."""

    train: tuple[Song, ...]
    val: tuple[Song, ...]
    n_features: int
    frame_rate: float

    def chorus_share(self) -> float:
        labels = np.concatenate([s.labels for s in self.train + self.val])
        return float(labels.mean())

    @classmethod
    def from_arrays(cls, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                    y_val: np.ndarray, frame_rate: float = 1.0) -> "SongData":
        """Your own data for a recipe (model/recipe.py): examples x [N, F] with labels y [N] in
        {0, 1} (each example a one-frame "song": train with frames: 1), or sequences x [N, T, F]
        with per-frame labels y [N, T]. Class 1 is the one whose F1 is reported."""
        def songs(x: np.ndarray, y: np.ndarray, split: str) -> tuple[Song, ...]:
            x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
            if x.ndim == 2:
                x, y = x[:, None, :], y.reshape(-1, 1)
            if x.ndim != 3 or y.shape != x.shape[:2] or not np.isin(y, (0, 1)).all():
                raise ValueError(f"{split}: x must be [N, F] or [N, T, F] and y [N] or [N, T] of "
                                 f"0/1 labels, got x {x.shape}, y {y.shape}")
            return tuple(Song(f"{split}{i}", x[i], y[i], ()) for i in range(len(x)))

        train, val = songs(x_train, y_train, "train"), songs(x_val, y_val, "val")
        if not train or not val:
            raise ValueError("from_arrays: need at least one training and one validation example")
        return cls(train, val, train[0].features.shape[1], frame_rate)


@dataclass
class Batch:
    """Windows of songs. Padded frames have mask False and label 0."""

    x: torch.Tensor  # [B, T, F] float32
    y: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] bool
    song_ids: list[str]
    starts: list[int]  # first frame of each window in its song

    def to(self, device: str | torch.device) -> "Batch":
        if str(device) == "cpu":
            return self
        return Batch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True),
                     self.mask.to(device, non_blocking=True), self.song_ids, self.starts)


# ---------------------------------------------------------------------------- song forms
def sample_form(rng: np.random.Generator) -> list[str]:
    """A pop form: [intro] (verse [prechorus] chorus [postchorus]) x 2-3 [bridge chorus+] [outro]."""
    form = ["intro"] if rng.random() < 0.9 else []
    has_pre, has_post = rng.random() < 0.45, rng.random() < 0.2
    for cycle in range(int(rng.choice([2, 3], p=[0.45, 0.55]))):
        if cycle < 2 or rng.random() < 0.6:
            form.append("verse")
        form += ["prechorus"] * has_pre + ["chorus"] + ["postchorus"] * has_post
    if rng.random() < 0.65:
        form += ["bridge", "chorus"] + ["chorus"] * (rng.random() < 0.35)
    if rng.random() < 0.55:
        form.append("outro")
    return form


def sample_sections(rng: np.random.Generator) -> tuple[list[tuple[str, float, float]], float]:
    """Sections with lengths in whole bars at the song's tempo (repeats keep their length),
    and the bar length in seconds."""
    bar_s = 240.0 / rng.uniform(80, 140)  # one 4/4 bar
    length_bars: dict[str, int] = {}
    out, t = [], 0.0
    for label in sample_form(rng):
        if label not in length_bars or rng.random() < 0.15:  # occasional longer/shorter repeat
            bars = MEDIAN_SECONDS[label] / bar_s * rng.lognormal(0.0, 0.3)
            length_bars[label] = max(2, int(round(bars / 2)) * 2)
        dur = length_bars[label] * bar_s
        out.append((label, t, t + dur))
        t += dur
    return out, bar_s


# ------------------------------------------------------------------------------ features
def render_song(song_id: str, sections: list[tuple[str, float, float]], n_features: int,
                frame_rate: float, rng: np.random.Generator, bar_s: float = 2.0) -> Song:
    """Render log-mel-like features [T, F] over a section timeline."""
    n_frames = int(round(sections[-1][2] * frame_rate))
    f_axis = np.linspace(-0.5, 0.5, n_features, dtype=np.float32)  # low .. high bands
    # Per-song variation: loudness, timbre envelope and tilt, key, noise level.
    gain = rng.normal(0.0, 0.8)
    envelope = sum(rng.normal(0, 0.5) * np.cos(np.pi * k * (f_axis + 0.5)) for k in range(1, 4))
    tilt = rng.normal(0.0, 0.6)
    key = int(rng.integers(12))
    noise = rng.uniform(0.35, 0.6)
    lift = rng.uniform(0.7, 1.3)  # how strongly this song marks its chorus
    bar_frames = max(2, int(round(frame_rate * bar_s)))
    progressions = {label: [TRIADS[i] for i in rng.integers(len(TRIADS), size=4)]
                    for label in MEDIAN_SECONDS}
    drum_bands = (f_axis < -0.35) | (f_axis > 0.3)

    x = np.empty((n_frames, n_features), dtype=np.float32)
    labels = np.zeros(n_frames, dtype=np.int64)
    band_pc = (np.arange(n_features) * 12 // 11) % 12  # pitch class each band leans to
    for label, start_s, end_s in sections:
        a, b = int(round(start_s * frame_rate)), min(n_frames, int(round(end_s * frame_rate)))
        if b <= a:
            continue
        t = np.arange(b - a)
        level = gain + lift * ENERGY[label] + rng.normal(0, 0.1)
        bright = tilt + lift * BRIGHTNESS[label]
        base = level + envelope + bright * f_axis  # [F]
        # Harmony: the section's progression, one chord per bar, as band activations.
        chord_idx = (t // bar_frames) % 4
        chroma = np.zeros((4, n_features), dtype=np.float32)
        for i, triad in enumerate(progressions[label]):
            chroma[i] = np.isin(band_pc, [(p + key) % 12 for p in triad]) * 0.6
        harmony = chroma[chord_idx]  # [t, F]
        texture = rng.normal(0, TEXTURE[label], size=(len(t), 1)) * drum_bands  # [t, F]
        x[a:b] = base + harmony + texture
        labels[a:b] = int(label == "chorus")
    x += rng.normal(0, noise, size=x.shape).astype(np.float32)
    return Song(song_id, x, labels, tuple(sections))


@functools.lru_cache(maxsize=8)
def _synthetic(n_songs: int, data_seed: int, n_features: int, frame_rate: float,
               val_fraction: float) -> SongData:
    root = np.random.SeedSequence([data_seed, 0xC0125])
    songs = []
    for i, child in enumerate(root.spawn(n_songs)):
        rng = np.random.default_rng(child)
        sections, bar_s = sample_sections(rng)
        songs.append(render_song(f"synth-{data_seed}-{i:04d}", sections, n_features, frame_rate,
                                 rng, bar_s))
    return _split(songs, val_fraction, root, n_features, frame_rate)


def _split(songs: list[Song], val_fraction: float, root: np.random.SeedSequence,
           n_features: int, frame_rate: float) -> SongData:
    """Split by song; the permutation comes from the next child of `root`."""
    n_val = min(len(songs) - 1, max(1, int(round(len(songs) * val_fraction))))
    order = np.random.default_rng(root.spawn(1)[0]).permutation(len(songs))
    val = tuple(songs[i] for i in sorted(order[:n_val]))
    train = tuple(songs[i] for i in sorted(order[n_val:]))
    return SongData(train, val, n_features, frame_rate)


def render_style(label: str, chorus: frozenset[str]) -> str:
    """The synthetic section type (a key of MEDIAN_SECONDS) that renders a real section label:
    chorus exactly when the label is chorus under chorus_labels, so labels follow the mapping."""
    if label in chorus:
        return "chorus"
    if label in ("prechorus", "postchorus"):
        return label
    for style, words in (("verse", ("verse", "rap")), ("intro", ("intro", "opening", "fadein",
                                                                   "silence")),
                         ("outro", ("outro", "ending", "fadeout", "coda"))):
        if any(w in label for w in words):
            return style
    return "bridge"  # bridge, inst, solo, break, transition, section, ...: the in-between sections


@functools.lru_cache(maxsize=4)
def _on_structures(structures: str, n_songs: int, data_seed: int, n_features: int,
                   frame_rate: float, val_fraction: float, chorus_labels: tuple[str, ...],
                   skip_bad: bool) -> SongData:
    """Synthetic features rendered over n_songs real section timelines (picked by data_seed).
    The unannotated lead-in before the first boundary is cut (time 0 = first section); a last
    section without an `end` line is left out (its length is unknown)."""
    forms = [s for s in harmonix.read_segments_dir(structures, chorus_labels, skip_bad)
             if s.sections]
    if n_songs > len(forms):
        raise ConfigError(f"n_songs: {n_songs} asked for, but structures {structures!r} has "
                          f"{len(forms)} usable segment files; set n_songs <= {len(forms)}")
    root = np.random.SeedSequence([data_seed, 0x57C7])
    picked = sorted(np.random.default_rng(root.spawn(1)[0]).permutation(len(forms))[:n_songs])
    chorus = harmonix.chorus_set(chorus_labels)
    songs = []
    for idx, child in zip(picked, root.spawn(n_songs)):
        form, rng = forms[idx], np.random.default_rng(child)
        t0 = form.sections[0].start
        sections = [(render_style(s.label, chorus), s.start - t0, s.end - t0)
                    for s in form.sections]
        bar_s = 240.0 / rng.uniform(80, 140)  # tempo is not in the segment file: draw one
        songs.append(render_song(form.track, sections, n_features, frame_rate, rng, bar_s))
    return _split(songs, val_fraction, root, n_features, frame_rate)


@functools.lru_cache(maxsize=4)
def _harmonix(data_dir: str, data_seed: int, val_fraction: float, chorus_labels: tuple[str, ...],
              skip_bad: bool, cache_dir: str | None, params: FeatureParams) -> SongData:
    tracks = harmonix.load_tracks(data_dir, params, chorus_labels, skip_bad, cache_dir)
    if len(tracks) < 2:
        raise DataError(f"data_dir: {data_dir!r} has {len(tracks)} usable track(s); "
                        f"need at least 2 (one to train, one to validate)")
    songs = [Song(t.track, t.features, t.labels, t.sections) for t in tracks]
    return _split(songs, val_fraction, np.random.SeedSequence([data_seed, 0x4A2]),
                  params.n_mels, params.frame_rate)


def make_data(cfg: TrainConfig) -> SongData:
    """The songs a config asks for. Cached per process on the data fields: cells of a study
    share their data. Files that cannot be used raise DataError (a ConfigError) naming
    the file; quirks that were handled are reported as harmonix.HarmonixWarning."""
    if cfg.data_source == "synthetic" and cfg.structures is None:
        data = _synthetic(cfg.n_songs, cfg.data_seed, cfg.n_features, cfg.frame_rate,
                          cfg.val_fraction)
    elif cfg.data_source == "synthetic":
        data = _on_structures(cfg.structures, cfg.n_songs, cfg.data_seed, cfg.n_features,
                              cfg.frame_rate, cfg.val_fraction, cfg.chorus_labels,
                              cfg.skip_bad_tracks)
    elif cfg.data_source == "harmonix":
        params = FeatureParams(cfg.frame_rate, cfg.n_features, cfg.sample_rate, cfg.n_fft,
                               cfg.hop_length)
        data = _harmonix(cfg.data_dir, cfg.data_seed, cfg.val_fraction, cfg.chorus_labels,
                         cfg.skip_bad_tracks, cfg.cache_dir, params)
    else:
        raise ValueError(f"data_source: unknown {cfg.data_source!r}")
    if cfg.features == "db" and cfg.feature_scale == 1.0:
        return data
    # Synthetic features are in bels (one unit = 10 dB); audio features are in dB.
    db_per_unit = 1.0 if cfg.data_source == "harmonix" else 10.0
    return transform_features(data, cfg.features, cfg.feature_scale, db_per_unit)


_TRANSFORMED: dict[tuple, tuple[SongData, SongData]] = {}


def transform_features(data: SongData, features: str, scale: float,
                       db_per_unit: float) -> SongData:
    """The same songs with features as `power` (10^(dB/10), the log forgotten) and/or multiplied
    by `scale`. float32, as a pipeline would hand them over: values past float32's range become
    inf, as they would there. Cached per process (the source data is cached too)."""
    key = (id(data), features, scale, db_per_unit)
    hit = _TRANSFORMED.get(key)
    if hit is not None and hit[0] is data:
        return hit[1]

    def convert(x: np.ndarray) -> np.ndarray:
        y = x.astype(np.float64)
        if features == "power":
            y = np.power(10.0, y * (db_per_unit / 10.0))
        with np.errstate(over="ignore"):
            return (y * scale).astype(np.float32)

    def songs(ss: tuple[Song, ...]) -> tuple[Song, ...]:
        return tuple(Song(s.song_id, convert(s.features), s.labels, s.sections) for s in ss)

    out = SongData(songs(data.train), songs(data.val), data.n_features, data.frame_rate)
    _TRANSFORMED[key] = (data, out)
    return out


def clear_cache() -> None:
    """Forget the per-process data cache (e.g. after the files under data_dir changed)."""
    for f in (_synthetic, _on_structures, _harmonix):
        f.cache_clear()
    _TRANSFORMED.clear()


# ------------------------------------------------------------------------------ batching
class WindowSampler:
    """Random fixed-length training windows, deterministic from a seed.

    Songs are concatenated once so that a batch is one fancy-index gather, not a Python loop.
    """

    def __init__(self, songs: tuple[Song, ...], frames: int, batch_size: int, seed: int):
        self.songs, self.frames, self.batch_size = songs, frames, batch_size
        self.lengths = np.array([len(s.labels) for s in songs])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        n_feat = songs[0].features.shape[1]
        # One zero row at the end serves every padded frame.
        self.x = np.concatenate([s.features for s in songs] + [np.zeros((1, n_feat), np.float32)])
        self.y = np.concatenate([s.labels for s in songs] + [np.zeros(1, np.int64)])
        self.pad_row = len(self.y) - 1
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A3]))
        self.p = self.lengths / self.lengths.sum()  # long songs are sampled more, as frames are

    def next(self) -> Batch:
        songs = self.rng.choice(len(self.songs), size=self.batch_size, p=self.p)
        span = np.maximum(self.lengths[songs] - self.frames, 0)
        starts = (self.rng.random(self.batch_size) * (span + 1)).astype(np.int64)
        return _gather(self, songs, starts)


def _gather(src: "WindowSampler", songs: np.ndarray, starts: np.ndarray) -> Batch:
    pos = starts[:, None] + np.arange(src.frames)[None, :]  # [B, T] frame in song
    mask = pos < src.lengths[songs][:, None]
    idx = np.where(mask, src.offsets[songs][:, None] + pos, src.pad_row)
    return Batch(torch.from_numpy(src.x[idx]), torch.from_numpy(src.y[idx]),
                 torch.from_numpy(mask), [src.songs[i].song_id for i in songs],
                 [int(s) for s in starts])


def eval_batches(songs: tuple[Song, ...], frames: int, batch_size: int) -> list[Batch]:
    """Every frame of every song exactly once: songs tiled into windows, the last one padded."""
    src = WindowSampler(songs, frames, batch_size, seed=0)
    pairs = [(i, s) for i, n in enumerate(src.lengths) for s in range(0, int(n), frames)]
    out = []
    for k in range(0, len(pairs), batch_size):
        chunk = np.array(pairs[k:k + batch_size])
        out.append(_gather(src, chunk[:, 0], chunk[:, 1]))
    return out
