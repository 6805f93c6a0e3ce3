"""Every knob of the optimizer in one place: one `Settings` value, one commented field per knob, passed down
explicitly from `dioe.optimize(..., settings=...)`. The environment variables DIOE reads are read here and
nowhere else.

    >>> from dioe import Settings
    >>> s = Settings(race_rounds=5, split_margin=0.05)
    >>> s.race_rounds, s.replan_threshold
    (5, 0.2)

The defaults are what DIOE ships with; tests and tools build a `Settings` instead of patching module globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import DIOEError
from .text import parse_size

ENV_CACHE_DIR = "DIOE_CACHE_DIR"                  # where compiled artifacts and profiles live
ENV_CACHE_MAX = "DIOE_CACHE_MAX"                  # the cap on the artifacts: a size such as 20G, or none
ENV_OPENVINO_TELEMETRY = "DIOE_OPENVINO_TELEMETRY"  # 1: leave OpenVINO's usage telemetry on while converting
DEFAULT_CACHE_MAX = 20 * 2 ** 30


def env_cache_dir() -> Path:
    """$DIOE_CACHE_DIR, else $XDG_CACHE_HOME/dioe, else ~/.cache/dioe."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dioe"


def env_cache_max() -> int | None:
    """The cap from $DIOE_CACHE_MAX (20 GiB when unset); None when it says "none" (no cap)."""
    raw = os.environ.get(ENV_CACHE_MAX)
    if raw is None or not raw.strip():
        return DEFAULT_CACHE_MAX
    if raw.strip().lower() in ("none", "off", "unlimited"):
        return None
    try:
        return parse_size(raw)
    except DIOEError as e:
        raise DIOEError(f"${ENV_CACHE_MAX}: {e}, or none for no cap") from None


def openvino_telemetry() -> bool:
    """Whether OpenVINO's converter may keep its usage telemetry ($DIOE_OPENVINO_TELEMETRY=1); off by default."""
    return os.environ.get(ENV_OPENVINO_TELEMETRY) == "1"


@dataclass(frozen=True)
class Settings:
    # -- what is tried ----------------------------------------------------------------------------------------
    # Backends profiled when `optimize(backends=None)`: Inductor compiles each segment for seconds, so it is
    # profiled only when named.
    backends: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
    # Largest relative error (max |diff| / max |eager|) a partition may show against eager before it goes to torch.
    tolerance: float = 1e-4

    # -- segmenting -------------------------------------------------------------------------------------------
    segment_target: int = 14       # about a transformer's layers: fine enough to mix backends, coarse enough to time
    segment_max: int = 32          # more would make per-call overheads and compile time dominate
    segment_min_share: float = 0.01  # a run under this share of the work is folded into a neighbour

    # -- measuring and re-planning ----------------------------------------------------------------------------
    # A plan measured this far (as a share) from its prediction is re-planned once from partition-level times;
    # float("inf"): never re-plan.
    replan_threshold: float = 0.20
    # Time per timed contender (a plan, a rival): heavy models at large batches get fewer calls.
    timing_budget_s: float = 1.0

    # -- the race -----------------------------------------------------------------------------------------------
    # A split plan must beat the best single engine by this share, else the one engine is kept (no copies, one
    # thread pool); a split predicted to gain less is not built at all.
    split_margin: float = 0.03
    # Whole-graph rivals: the best option of every backend, plus up to `rivals` more predicted within
    # `rival_window` times the best one (a backend compiled whole fuses across segments, so its segment sum
    # overstates it).
    rivals: int = 2
    rival_window: float = 1.25
    # Interleaved rounds per contender; ranked by the mean of their faster half (noise only ever adds time).
    race_rounds: int = 3
    # Contenders within `race_close` of the leader, and any the profile predicted faster than it, get
    # `race_extra` more rounds.
    race_close: float = 0.10
    race_extra: int = 3
    # Calls per contender and round, within its share of `timing_budget_s`: a 100 ms model gets 3, a 0.5 ms one
    # all of them (five calls of a sub-millisecond model once picked torch at 2.4x the best engine).
    race_repeats: int = 200

    # -- precision ------------------------------------------------------------------------------------------------
    # Inputs an int8 engine is calibrated on, apart from the held-out ones it is judged on (Budget.samples): the
    # min-max ranges of small models settle within a few dozen; NNCF's own default is 300.
    calibration_samples: int = 32
    # A lower precision whose whole graph misses the budget is tried again on up to this many contiguous parts of
    # about equal time, the sensitive ones kept at fp32 (`dioe.mixed`); each part is compiled at both precisions,
    # so more parts cost more builds. 0 or 1: whole graphs only.
    mixed_parts: int = 4

    # -- live precision (optimize(precision="live")) --------------------------------------------------------------
    # Calls served before the background build may start (besides full sample reservoirs): reservoirs filled by
    # the first calls alone would calibrate on whatever traffic came first.
    live_after_calls: int = 128
    # Cap on the bytes of sampled inputs held (calibration and shadow parts); optimize refuses a budget that
    # cannot fit under it rather than sample less than it judges on.
    live_sample_bytes: int = 256 * 2 ** 20
    # Once promoted, one call in this many is shadow-checked against fp32 eager, off the caller's path.
    live_shadow_every: int = 16
    # Shadow checks waiting beyond this many are dropped (and counted): the queue, and its memory, stay bounded.
    live_shadow_queue: int = 64
    # Lower-precision plans built and shadow-tested at most this many times per model: one rejected or demoted is
    # tried again on fresh samples until then, so a machine where none pays stops paying for builds.
    live_attempts: int = 3

    # -- the disk cache -------------------------------------------------------------------------------------------
    cache_dir: Path = field(default_factory=env_cache_dir)
    # Artifacts beyond this many bytes are evicted, least recently used first; None: no cap.
    cache_max_bytes: int | None = field(default_factory=env_cache_max)

    def __post_init__(self):
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "backends", tuple(self.backends))
        positive = ("tolerance", "segment_target", "segment_max", "timing_budget_s", "rival_window", "race_rounds",
                    "race_repeats", "calibration_samples", "live_after_calls", "live_sample_bytes", "live_shadow_every",
                    "live_shadow_queue", "live_attempts")
        share = ("segment_min_share", "split_margin", "race_close")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in positive and not (isinstance(v, (int, float)) and v > 0):
                raise DIOEError(f"Settings.{f.name} must be a number > 0, got {v!r}")
            if f.name in share and not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise DIOEError(f"Settings.{f.name} must be a share in [0, 1), got {v!r}")
            if f.name == "replan_threshold" and not (isinstance(v, (int, float)) and v >= 0):
                raise DIOEError(f"Settings.{f.name} must be a share >= 0 (float('inf'): never), got {v!r}")
            if f.name in ("segment_target", "segment_max", "race_rounds", "race_repeats", "calibration_samples",
                          "live_after_calls", "live_sample_bytes", "live_shadow_every", "live_shadow_queue",
                          "live_attempts") \
                    and (isinstance(v, bool) or not isinstance(v, int)):
                raise DIOEError(f"Settings.{f.name} must be a whole number > 0, got {v!r}")
            if f.name in ("rivals", "race_extra", "mixed_parts") and not (isinstance(v, int) and v >= 0):
                raise DIOEError(f"Settings.{f.name} must be an integer >= 0, got {v!r}")
        if self.cache_max_bytes is not None and self.cache_max_bytes < 0:
            raise DIOEError(f"Settings.cache_max_bytes must be >= 0 or None, got {self.cache_max_bytes!r}")
