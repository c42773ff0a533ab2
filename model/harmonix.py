"""Real songs in the Harmonix Set's format: segment annotations, audio files and feature files.

A data root (`data_dir`, README "Your own songs") holds

    segments/<track>.txt            one `time label` per line (seconds), the last one `<t> end`
    features/<track>.npy            log-mel [n_mels, frames] at frame_rate, or at the rate given
                                    in features/<track>.json ({"frame_rate": 43.07} or
                                    {"sample_rate": 22050, "hop_length": 512})
    audio/<track>.wav|flac|ogg|mp3  decoded with soundfile, turned into log-mel with librosa

(model/audio.py reads both into features [T, F]; this module parses the segment files, pairs them
with the features and labels the frames.) A track needs its segment file and one of features/ or audio/ (features/ wins when both are
there). Tracks with segments but neither, and feature or audio files without segments, are
reported in a HarmonixWarning and left out; never silently dropped.

Frames. Frame i of every feature matrix in this repo stands for time t_i = i / frame_rate (the
centre of librosa's centred STFT frames; how audio is pooled to it: model/audio.py), and its
label is the section that contains t_i. A song's frames run from 0 s to its `end` line; frames before the first annotated section (a count-in, silence) are non-chorus.

Labels. A label is matched ignoring case, punctuation and a trailing number (`chorus2`,
`Chorus_3` and `verse1a` read as chorus, chorus and verse: the Harmonix Set numbers variants of a
section), and it is chorus when it is in `chorus_labels`. The default counts every chorus
variant of the Harmonix Set (chorus, altchorus, instchorus, chorusinst, quietchorus, ...,
refrain) and neither of
  * prechorus: a build-up into the chorus, with its own melody and lyrics; SpecTNT's taxonomy
    (Wang et al. 2022) has no pre-chorus class and does not count it as chorus;
  * postchorus: the annotators marked a boundary where the chorus ends, so the default keeps the
    positive class to what they called chorus. Post-choruses are often chorus-like (a hook tag,
    full energy), so they are the main source of label noise either way: add `postchorus` to
    chorus_labels to count them (chorus share of the Harmonix Set: 35.4 % without, 38.7 % with).
A label that names a chorus or refrain but is not in chorus_labels is reported.

Quirks of real files, each reported with the file and line (HarmonixWarning) or refused with an
error that names them (DataError):
  * numbered labels: read without the number; one summary warning per directory;
  * no `end` line: the last section runs to the end of the audio, or is left out where there is
    no audio (synthetic songs on real timelines);
  * a second `end` or lines after `end`: ignored, the annotation ends at the first `end`;
  * unsorted times: sorted; duplicated times and other zero-length sections: dropped;
  * a line that is not `time label`, a time that is not a number >= 0, an empty or unreadable
    file: DataError (with skip_bad_tracks the track is left out with a warning instead).
Audio that decodes to fewer seconds than its annotation (by more than SHORTFALL_S) is refused:
it is truncated, or not the recording that was annotated.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import numpy as np

from model.audio import (AUDIO_EXTENSIONS, FeatureParams, audio_features, default_cache_dir,
                         read_feature_file)
from model.config import DataError, TrainConfig

DEFAULT_CHORUS_LABELS: tuple[str, ...] = TrainConfig.chorus_labels
SHORTFALL_S = 1.0  # audio may end this much before its annotation's `end` (fade, encoder delay)
_CHORUS_LIKE = ("chorus", "refrain")
_NOT_CHORUS_BY_CHOICE = ("prechorus", "postchorus")


class HarmonixWarning(UserWarning):
    """A quirk in a data file that was handled (the message names file and line), or tracks left
    out because their annotation or their audio/features are missing."""


class Section(NamedTuple):
    label: str  # normalised (see normalize_label)
    start: float  # seconds
    end: float
    line: int  # line of the segment file that starts it


@dataclass(frozen=True)
class Segments:
    """One parsed segment file. `sections` are contiguous and of non-zero length."""

    track: str
    path: Path
    sections: tuple[Section, ...]
    end: Optional[float]  # time of the (first) `end` line; None when the file has none
    open_section: Optional[Section]  # without an `end` line: the last section (end = inf)
    renamed: tuple[tuple[int, str, str], ...]  # (line, label as written, label as read)

    @property
    def annotated_s(self) -> float:
        return sum(s.end - s.start for s in self.sections)


def normalize_label(label: str) -> str:
    """`Chorus_2` -> `chorus`, `verse1a` -> `verse`: lower case, a trailing number (and one
    letter after it) dropped, then everything but letters dropped."""
    s = re.sub(r"\d+[a-z]?$", "", label.strip().lower())
    return re.sub(r"[^a-z]", "", s)


def chorus_set(chorus_labels: Iterable[str]) -> frozenset[str]:
    return frozenset(normalize_label(lab) for lab in chorus_labels)


# --------------------------------------------------------------------------- segment files
def parse_segments(path: str | Path) -> Segments:
    """Read one Harmonix-format segment file; quirks are warned about, unreadable files raise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read this segment file ({e})") from None
    rows: list[tuple[float, str, int]] = []  # (time, label as written, line)
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split(None, 1)
        if len(parts) < 2:
            raise DataError(f"{path} line {n}: expected 'time label', got {line.strip()!r}")
        try:
            t = float(parts[0])
        except ValueError:
            raise DataError(f"{path} line {n}: time {parts[0]!r} is not a number "
                            f"(expected 'time label')") from None
        if not (math.isfinite(t) and t >= 0):
            raise DataError(f"{path} line {n}: time must be a number >= 0, got {parts[0]!r}")
        if not normalize_label(parts[1]):
            raise DataError(f"{path} line {n}: label {parts[1]!r} has no letters")
        rows.append((t, parts[1].strip(), n))
    if not rows:
        raise DataError(f"{path}: no 'time label' lines")

    for (t0, _, n0), (t1, _, n1) in zip(rows, rows[1:]):
        if t1 < t0:
            _warn(f"{path} line {n1}: time {t1:g} s is before line {n0}'s {t0:g} s; "
                  f"lines sorted by time")
    rows.sort(key=lambda r: r[0])  # stable: equal times keep their order

    ends = [i for i, r in enumerate(rows) if normalize_label(r[1]) == "end"]
    end_row = rows[ends[0]] if ends else None
    body = rows[:ends[0]] if ends else rows
    if ends and ends[0] + 1 < len(rows):
        after = rows[ends[0] + 1:]
        what = ("a second 'end'" if all(normalize_label(r[1]) == "end" for r in after)
                else "lines after 'end'")
        _warn(f"{path} line {after[0][2]}: {what} (line {end_row[2]} ended the song at "
              f"{end_row[0]:g} s); ignored, the annotation ends at the first 'end'")
    if not body:
        raise DataError(f"{path}: no section before 'end' (line {end_row[2]})")
    if end_row is None:
        t, lab, n = body[-1]
        _warn(f"{path} line {n}: no 'end' line, so the last section ({lab!r} from {t:g} s) has "
              f"no end: it runs to the end of the audio, or is left out where there is no audio")

    sections, renamed = [], []
    for t, lab, n in body:
        if normalize_label(lab) != lab.lower():
            renamed.append((n, lab, normalize_label(lab)))
    closing = body[1:] + ([end_row] if end_row else [])
    for (t, lab, n), (t_next, lab_next, n_next) in zip(body, closing):
        if t_next == t:
            why = (f"line {n_next} repeats it" if (lab_next, t_next) == (lab, t)
                   else f"line {n_next} starts at the same time")
            _warn(f"{path} line {n}: section {lab!r} at {t:g} s has zero length ({why}); dropped")
            continue
        sections.append(Section(normalize_label(lab), t, t_next, n))
    open_section = None
    if end_row is None:
        t, lab, n = body[-1]
        open_section = Section(normalize_label(lab), t, math.inf, n)
    if not sections and open_section is None:
        raise DataError(f"{path}: no section of non-zero length")
    return Segments(path.stem, path, tuple(sections), end_row[0] if end_row else None,
                    open_section, tuple(renamed))


def read_segments_dir(directory: str | Path, chorus_labels: Iterable[str] = DEFAULT_CHORUS_LABELS,
                      skip_bad: bool = False) -> list[Segments]:
    """Every <track>.txt in `directory` (or in its segments/, for a data root), sorted by name,
    with the label report (report_labels)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (expected Harmonix-format segment "
                        f"files <track>.txt)")
    files = _files(directory, (".txt",))
    if not files and (directory / "segments").is_dir():
        directory = directory / "segments"
        files = _files(directory, (".txt",))
    if not files:
        raise DataError(f"{directory}: no segment files (<track>.txt) in this directory")
    out = []
    for p in files:
        try:
            out.append(parse_segments(p))
        except DataError as e:
            _skip_or_raise(e, skip_bad)
    report_labels(out, chorus_labels, str(directory))
    return out


def report_labels(segments: list[Segments], chorus_labels: Iterable[str], where: str) -> None:
    """One warning for numbered labels in `segments`, and one per file for labels that name a
    chorus or refrain but are not counted as chorus."""
    renamed = [(s.path, n, raw, lab) for s in segments for n, raw, lab in s.renamed]
    if renamed:
        path, n, raw, lab = renamed[0]
        n_files = len({r[0] for r in renamed})
        _warn(f"{where}: {len(renamed)} labels in {n_files} files carry a number or punctuation "
              f"and are read without it (e.g. {path} line {n}: {raw!r} -> {lab!r})")
    chorus = chorus_set(chorus_labels)
    for s in segments:
        every = s.sections + ((s.open_section,) if s.open_section else ())
        odd = [(sec.line, sec.label) for sec in every
               if any(w in sec.label for w in _CHORUS_LIKE) and sec.label not in chorus
               and sec.label not in _NOT_CHORUS_BY_CHOICE]
        if odd:
            lines = ", ".join(f"line {n} {lab!r}" for n, lab in odd)
            _warn(f"{s.path}: {lines}: named like a chorus but not in chorus_labels; counted as "
                  f"non-chorus")


def chorus_share(segments: Iterable[Segments],
                 chorus_labels: Iterable[str] = DEFAULT_CHORUS_LABELS) -> float:
    """Chorus seconds / annotated seconds (closed sections only; before the first boundary and
    after `end` is not annotated)."""
    chorus = chorus_set(chorus_labels)
    total = ch = 0.0
    for s in segments:
        for sec in s.sections:
            total += sec.end - sec.start
            ch += (sec.end - sec.start) * (sec.label in chorus)
    return ch / total if total else float("nan")


def frame_labels(sections: Iterable[tuple[str, float, float]], n_frames: int, frame_rate: float,
                 chorus_labels: Iterable[str] = DEFAULT_CHORUS_LABELS) -> np.ndarray:
    """Labels [n_frames] (1 = chorus): frame i is chorus when t_i = i / frame_rate lies in a
    chorus section [start, end). Frames in no section are 0."""
    chorus = chorus_set(chorus_labels)
    t = np.arange(n_frames) / frame_rate
    y = np.zeros(n_frames, dtype=np.int64)
    for label, start, end, *_ in sections:
        if normalize_label(label) in chorus:
            y[(t >= start) & (t < end)] = 1
    return y


# ----------------------------------------------------------------------------- the tracks
@dataclass(frozen=True)
class TrackScan:
    """What a data root holds: tracks with both an annotation and features or audio, and the
    tracks that have only one of the two."""

    paired: tuple[tuple[str, Path, Path], ...]  # (track, segment file, feature or audio file)
    no_media: tuple[str, ...]  # segments but neither features nor audio
    no_segments: tuple[str, ...]  # features or audio but no segments


def scan_tracks(data_dir: str | Path) -> TrackScan:
    """Pair segments/<track>.txt with features/<track>.npy or audio/<track>.<ext>."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data_dir: no such directory: {str(data_dir)!r}")
    seg_dir = root / "segments"
    if not seg_dir.is_dir():
        raise DataError(f"data_dir: {str(data_dir)!r} has no segments/ directory (expected "
                        f"segments/<track>.txt beside features/ or audio/)")
    segs = {p.stem: p for p in _files(seg_dir, (".txt",))}
    media: dict[str, Path] = {}
    feat_dir, audio_dir = root / "features", root / "audio"
    if audio_dir.is_dir():
        by_track: dict[str, list[Path]] = {}
        for p in _files(audio_dir, AUDIO_EXTENSIONS):
            by_track.setdefault(p.stem, []).append(p)
        for track, paths in by_track.items():
            paths.sort(key=lambda p: AUDIO_EXTENSIONS.index(p.suffix.lower()))
            if len(paths) > 1:
                _warn(f"{audio_dir}: {len(paths)} audio files for track {track!r} "
                      f"({', '.join(p.name for p in paths)}); using {paths[0].name}")
            media[track] = paths[0]
    if feat_dir.is_dir():  # precomputed features win over audio
        media.update({p.stem: p for p in _files(feat_dir, (".npy",))})
    paired = tuple((t, segs[t], media[t]) for t in sorted(segs) if t in media)
    return TrackScan(paired, tuple(t for t in sorted(segs) if t not in media),
                     tuple(t for t in sorted(media) if t not in segs))


@dataclass(frozen=True)
class Track:
    track: str
    features: np.ndarray  # [T, F] float32
    labels: np.ndarray  # [T] int64
    sections: tuple[tuple[str, float, float], ...]  # (label, start_s, end_s), as framed


def load_tracks(data_dir: str | Path, params: FeatureParams,
                chorus_labels: Iterable[str] = DEFAULT_CHORUS_LABELS, skip_bad: bool = False,
                cache_dir: Optional[str | Path] = None) -> list[Track]:
    """Every paired track of a data root, as features [T, F] and frame labels [T]."""
    scan = scan_tracks(data_dir)
    if scan.no_media:
        _warn(f"{data_dir}: {len(scan.no_media)} tracks have segments but no features/<track>.npy "
              f"or audio/<track>.{{{','.join(e[1:] for e in AUDIO_EXTENSIONS)}}}, left out: "
              f"{_names(scan.no_media)}")
    if scan.no_segments:
        _warn(f"{data_dir}: {len(scan.no_segments)} feature or audio files have no "
              f"segments/<track>.txt, left out: {_names(scan.no_segments)}")
    if not scan.paired:
        raise DataError(f"data_dir: {str(data_dir)!r} has no track with both segments/<track>.txt "
                        f"and features/<track>.npy or audio/<track>.<ext>")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    segments, tracks = [], []
    for track, seg_path, media in scan.paired:
        try:
            seg = parse_segments(seg_path)
            if media.suffix == ".npy":
                x = read_feature_file(media, params)
            else:
                x = audio_features(media, params, cache)
            tracks.append(_frame_track(seg, x, params.frame_rate, chorus_labels, media))
            segments.append(seg)
        except DataError as e:
            _skip_or_raise(e, skip_bad)
    report_labels(segments, chorus_labels, str(data_dir))
    return tracks


def _frame_track(seg: Segments, x: np.ndarray, frame_rate: float, chorus_labels: Iterable[str],
                 media: Path) -> Track:
    """Cut features [T, F] to the annotation and label their frames."""
    duration = len(x) / frame_rate
    sections = [(s.label, s.start, s.end) for s in seg.sections]
    if seg.open_section is not None:  # no `end` line: the last section runs to the audio's end
        if seg.open_section.start < duration:
            sections.append((seg.open_section.label, seg.open_section.start, duration))
    end = seg.end if seg.end is not None else duration
    if duration < end - SHORTFALL_S:
        raise DataError(f"{media}: {duration:.2f} s of audio, but {seg.path} annotates up to "
                        f"{end:.2f} s (truncated file, or not the annotated recording?)")
    n = min(len(x), int(math.ceil(end * frame_rate - 1e-9)))  # frames with t_i < end
    return Track(seg.track, np.ascontiguousarray(x[:n], dtype=np.float32),
                 frame_labels(sections, n, frame_rate, chorus_labels), tuple(sections))


# ---------------------------------------------------------------------------------- helpers
def _files(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files with these suffixes (any case), sorted; hidden files (.DS_Store, ._x.wav) skipped."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in suffixes
                  and not p.name.startswith(".") and p.is_file())


def _warn(msg: str) -> None:
    warnings.warn(msg, HarmonixWarning, stacklevel=3)


def _skip_or_raise(err: DataError, skip: bool) -> None:
    if not skip:
        raise DataError(f"{err} (set skip_bad_tracks: true to go on without this track)") from None
    _warn(f"{err}; track left out (skip_bad_tracks)")


def _names(tracks: tuple[str, ...], limit: int = 10) -> str:
    more = f" and {len(tracks) - limit} more" if len(tracks) > limit else ""
    return ", ".join(tracks[:limit]) + more
