"""From audio or feature files to log-mel features [T, F] at a song set's frame rate.

Two sources (model/harmonix.py pairs them with a track's segment file):

    features/<track>.npy            log-mel [n_mels, frames] at frame_rate, or at the rate given
                                    in features/<track>.json ({"frame_rate": 43.07} or
                                    {"sample_rate": 22050, "hop_length": 512})
    audio/<track>.wav|flac|ogg|mp3  decoded with soundfile, turned into log-mel with librosa,
                                    and cached (keyed by the file's content and FeatureParams)

Frames. Frame i stands for time t_i = i / frame_rate (the centre of librosa's centred STFT
frames). Audio goes to a mel power spectrogram at sample_rate / hop_length frames per second
(centred, so fine frame j is at j * hop_length / sample_rate), whose frames are averaged in power
over [t_i - 0.5 / frame_rate, t_i + 0.5 / frame_rate) and only then taken to dB. Feature files at
a higher rate are averaged the same way (in their own log domain).

Files that cannot be used (truncated or corrupt audio, a feature matrix of the wrong shape, a bad
sidecar) raise DataError naming the file. soundfile and librosa are imported only when audio is
read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import DataError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")  # in order of preference
FEATURE_VERSION = 1  # part of the cache key: bump when the feature computation changes


@dataclass(frozen=True)
class FeatureParams:
    """How features are made and what the model expects of them."""

    frame_rate: float
    n_mels: int
    sample_rate: int = 22050
    n_fft: int = 2048
    hop_length: int = 512

    def key(self) -> dict:
        return {"version": FEATURE_VERSION, "frame_rate": self.frame_rate, "n_mels": self.n_mels,
                "sample_rate": self.sample_rate, "n_fft": self.n_fft,
                "hop_length": self.hop_length}


# ---------------------------------------------------------------------------- feature files
def read_feature_file(path: Path, params: FeatureParams) -> np.ndarray:
    """features/<track>.npy [n_mels, frames] -> [T, F] at params.frame_rate."""
    try:
        m = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read this .npy file ({e})") from None
    if m.ndim != 2:
        raise DataError(f"{path}: expected a log-mel matrix [n_mels, frames], got shape "
                        f"{list(m.shape)}")
    if m.shape[0] != params.n_mels:
        hint = (" (it looks transposed: features are [n_mels, frames])"
                if m.shape[1] == params.n_mels else f"; set n_features: {m.shape[0]} to use it")
        raise DataError(f"{path}: {m.shape[0]} bands, but n_features is {params.n_mels}{hint}")
    bad = ~np.isfinite(m)
    if bad.any():
        band, frame = np.argwhere(bad)[0]
        raise DataError(f"{path}: {int(bad.sum())} non-finite values (first at band {band}, "
                        f"frame {frame})")
    rate = _sidecar_rate(path.with_suffix(".json"), params.frame_rate)
    return pool_frames(m.T.astype(np.float32), rate, params.frame_rate, path)


def _sidecar_rate(path: Path, default: float) -> float:
    if not path.exists():
        return default
    try:
        meta = json.loads(path.read_text())
        if "frame_rate" in meta:
            rate = float(meta["frame_rate"])
        else:
            rate = float(meta["sample_rate"]) / float(meta["hop_length"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path}: expected {{\"frame_rate\": R}} or {{\"sample_rate\": S, "
                        f"\"hop_length\": H}} ({type(e).__name__}: {e})") from None
    if not (math.isfinite(rate) and rate > 0):
        raise DataError(f"{path}: frame rate must be > 0, got {rate!r}")
    return rate


def pool_frames(x: np.ndarray, src_rate: float, dst_rate: float, where: object = "") -> np.ndarray:
    """Average frames [T, F] at src_rate down to dst_rate: output frame i (at t_i = i / dst_rate)
    is the mean of the input frames at t_j in [t_i - 0.5 / dst_rate, t_i + 0.5 / dst_rate)."""
    if abs(src_rate - dst_rate) <= 1e-9 * dst_rate:
        return x
    if src_rate < dst_rate:
        raise DataError(f"{where}: features at {src_rate:g} frames/s cannot feed frame_rate "
                        f"{dst_rate:g}; set frame_rate: {src_rate:g} or lower")
    idx = np.floor(np.arange(len(x)) * (dst_rate / src_rate) + 0.5).astype(np.int64)  # [T]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    sums = np.add.reduceat(x.astype(np.float64), starts, axis=0)
    counts = np.diff(np.r_[starts, len(x)])[:, None]
    return (sums / counts).astype(np.float32)


# ------------------------------------------------------------------------------------ audio
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chorus-ablations"


def feature_cache_path(path: Path, params: FeatureParams, cache_dir: Path) -> Path:
    """Cache file of an audio file's features: keyed by its content and the feature params."""
    with open(path, "rb") as f:
        content = hashlib.file_digest(f, "sha256").hexdigest()
    key = hashlib.sha256(json.dumps({"content": content, **params.key()},
                                    sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / "features" / f"{path.stem}-{key}.npy"


def audio_features(path: Path, params: FeatureParams, cache_dir: Path) -> np.ndarray:
    """Log-mel features [T, F] of an audio file, read from the cache when it has them."""
    cached = feature_cache_path(path, params, cache_dir)
    if cached.exists():
        try:
            return np.load(cached, allow_pickle=False).T  # stored [n_mels, frames]
        except (OSError, ValueError, EOFError):
            pass  # unreadable cache entry: compute it again
    x = log_mel(decode_audio(path, params.sample_rate), params)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:  # write then rename: readers never see half a file
        np.save(f, np.ascontiguousarray(x.T))
    os.replace(tmp, cached)
    return x


def decode_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at sample_rate. Truncated or corrupt files raise DataError."""
    import soundfile as sf

    _check_wav_header(path)
    try:
        declared = sf.info(str(path)).frames
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [n, channels]
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise DataError(f"{path}: cannot decode this audio file ({e})") from None
    if len(data) == 0:
        raise DataError(f"{path}: no audio samples (empty or truncated file)")
    # An MP3's sample count in its header can be an estimate (VBR without a Xing/LAME tag); a
    # truncated MP3 is caught against its annotation instead (harmonix.SHORTFALL_S).
    if path.suffix.lower() != ".mp3" and 0 < declared < 2**62 and len(data) < declared:
        raise DataError(f"{path}: truncated: {len(data)} of the {declared} samples its header "
                        f"declares could be decoded")
    y = data.mean(axis=1)
    if sr != sample_rate:
        import librosa

        y = librosa.resample(y, orig_sr=sr, target_sr=sample_rate)
    return y.astype(np.float32)


def _check_wav_header(path: Path) -> None:
    """libsndfile reads a cut-off WAV without complaint: compare the RIFF size with the file."""
    if path.suffix.lower() != ".wav":
        return
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        declared = int.from_bytes(head[4:8], "little") + 8
        actual = path.stat().st_size
        if declared != 0xFFFFFFFF + 8 and actual < declared:
            raise DataError(f"{path}: truncated: its header declares {declared} bytes, the file "
                            f"has {actual}")


def log_mel(y: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Samples -> log-mel [T, n_mels] in dB at params.frame_rate (see the module docstring)."""
    import librosa

    power = librosa.feature.melspectrogram(y=y, sr=params.sample_rate, n_fft=params.n_fft,
                                           hop_length=params.hop_length, n_mels=params.n_mels,
                                           power=2.0)  # [n_mels, frames], centred frames
    pooled = pool_frames(power.T, params.sample_rate / params.hop_length, params.frame_rate)
    return librosa.power_to_db(pooled, ref=1.0, amin=1e-10, top_db=None).astype(np.float32)
