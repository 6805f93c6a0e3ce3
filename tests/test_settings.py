"""Settings: every knob in one frozen value, checked when it is made, with errors that name the field."""

import dataclasses
from pathlib import Path

import pytest

import dioe
from dioe.settings import Settings


def test_defaults_and_the_environment(monkeypatch, tmp_path):
    s = Settings()
    assert (s.replan_threshold, s.split_margin, s.race_rounds, s.race_extra, s.tolerance) == (0.2, 0.03, 3, 3, 1e-4)
    assert s.backends == ("torch", "onnxruntime", "openvino")
    monkeypatch.setenv("DIOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DIOE_CACHE_MAX", "500M")
    s = Settings(backends=["torch"], cache_dir=str(tmp_path / "mine"))
    assert s.cache_max_bytes == 500 * 2 ** 20 and Settings().cache_dir == tmp_path
    assert s.backends == ("torch",) and s.cache_dir == tmp_path / "mine" and isinstance(s.cache_dir, Path)
    monkeypatch.setenv("DIOE_CACHE_MAX", "none")
    assert Settings().cache_max_bytes is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.race_rounds = 5
    assert hash(Settings(cache_dir=tmp_path)) == hash(Settings(cache_dir=tmp_path))


@pytest.mark.parametrize("field, value, expected", [
    ("tolerance", 0, "a number > 0"),
    ("segment_target", -1, "a number > 0"),
    ("timing_budget_s", "1s", "a number > 0"),
    ("race_rounds", 0, "a number > 0"),
    ("race_repeats", None, "a number > 0"),
    ("rival_window", 0.0, "a number > 0"),
    ("replan_threshold", -0.1, "a share.*"),
    ("split_margin", 3, r"a share in \[0, 1\)"),
    ("segment_min_share", "1%", r"a share in \[0, 1\)"),
    ("race_close", float("nan"), r"a share in \[0, 1\)"),
    ("rivals", -1, "an integer >= 0"),
    ("race_extra", 1.5, "an integer >= 0"),
    ("cache_max_bytes", -1, ">= 0 or None"),
])
def test_a_bad_setting_names_its_field_and_what_it_takes(field, value, expected):
    with pytest.raises(dioe.DIOEError, match=rf"^Settings\.{field} must be {expected}, got {value!r}"):
        Settings(**{field: value})


def test_a_bad_cache_cap_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("DIOE_CACHE_MAX", "lots")
    with pytest.raises(dioe.DIOEError, match=r"^\$DIOE_CACHE_MAX: cache size 'lots' is not a size.*, or none for "
                                             "no cap$"):
        Settings()


def test_optimize_takes_its_knobs_from_settings(tmp_path):
    """The backends profiled by default and the race's rounds come from `settings`; a cache_dir given to optimize
    overrides the settings' own."""
    import torch

    m, x = torch.nn.Linear(4, 2).eval(), torch.randn(1, 4)
    settings = Settings(backends=("torch",), cache_dir=tmp_path / "a", race_rounds=1, race_extra=0)
    opt = dioe.optimize(m, (x,), settings=settings, cache_dir=tmp_path / "b", precision="fp32")
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "profiles").is_dir()
    assert {p.backend for p in opt.plan.partitions} == {"torch"}, opt.plan.summary()
    assert opt.race.rounds and all(len(r) == 1 for r in opt.race.rounds.values()), opt.race
