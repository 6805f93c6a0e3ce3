"""The disk cache: compiled artifacts evicted least recently used first, whole, never the ones in use."""

import os
import time

import pytest
import torch

import dioe
from dioe import backends, cache, integrity
from dioe.cli import main
from dioe.errors import DIOEError

from helpers import assert_matches_eager, eager


def _file(path, size, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


@pytest.fixture
def filled(tmp_path):
    """Three artifacts, oldest first: a (ORT model + weights), b (OpenVINO IR pair), c (ORT); a profile; a folder
    that is not DIOE's. The folder is DIOE's cache: it carries the marker DIOE writes when it creates one."""
    integrity.mark(tmp_path)
    files = {
        "a": [_file(tmp_path / "onnxruntime" / "a.onnx", 100, 300), _file(tmp_path / "onnxruntime" / "a.onnx.data",
                                                                          900, 300)],
        "b": [_file(tmp_path / "openvino" / "b.xml", 200, 200), _file(tmp_path / "openvino" / "b.bin", 800, 200)],
        "c": [_file(tmp_path / "onnxruntime" / "c.onnx", 1000, 100)],
    }
    _file(tmp_path / "openvino" / "blobs" / "123.blob", 30, 50)  # OpenVINO's own compiled-blob cache
    _file(tmp_path / "openvino" / "blobs" / "456.blob", 20, 10)
    _file(tmp_path / "profiles" / "g-f.json", 50, 400)
    _file(tmp_path / "notes" / "mine.txt", 10, 500)
    return tmp_path, files


def test_artifacts_are_grouped_by_digest_oldest_first(filled):
    root, _ = filled
    found = cache.artifacts(root)
    assert [(a.backend, a.digest, a.bytes) for a in found] == [
        ("onnxruntime", "a", 1000), ("openvino", "b", 1000), ("onnxruntime", "c", 1000),
        ("openvino", "blobs/123", 30), ("openvino", "blobs/456", 20)], "each engine-cache blob on its own"
    cache.touch(root / "onnxruntime" / "a.onnx")  # reused now: evicted last
    assert [a.digest for a in cache.artifacts(root)] == ["b", "c", "blobs/123", "blobs/456", "a"]


def test_trim_evicts_whole_artifacts_least_recently_used_first_and_keeps_those_in_use(filled):
    root, files = filled
    gone = cache.trim(root, max_bytes=1550, keep=[files["a"][0]])
    assert [a.digest for a in gone] == ["b", "c"], "a is in use, so b and c go although a is the oldest"
    assert (root / "openvino" / "blobs" / "456.blob").exists()
    assert all(p.exists() for p in files["a"]) and not any(p.exists() for p in files["b"] + files["c"])
    assert (root / "profiles" / "g-f.json").exists() and (root / "notes" / "mine.txt").exists()
    assert cache.trim(root, max_bytes=None) == [], "no cap, nothing evicted"


def test_clear_removes_only_dioe_folders(filled):
    root, _ = filled
    assert cache.clear(root) == 3100
    assert cache.artifacts(root) == [] and not (root / "profiles").exists()
    assert (root / "notes" / "mine.txt").exists()


def test_sizes_and_a_bad_cap_name_what_was_expected(monkeypatch):
    assert cache.parse_size("20G") == 20 * 2 ** 30 and cache.parse_size("1.5MiB") == 1536 * 1024
    assert cache.parse_size("4096") == 4096
    monkeypatch.setenv(cache.ENV_MAX, "none")
    assert cache.max_bytes() is None
    monkeypatch.setenv(cache.ENV_MAX, "lots")
    with pytest.raises(DIOEError, match=r"\$DIOE_CACHE_MAX: cache size 'lots' is not a size.*such as 20G"):
        cache.max_bytes()
    with pytest.raises(DIOEError, match="DIOE_CACHE_MAX"):
        dioe.optimize(torch.nn.Linear(2, 2), (torch.randn(1, 2),), precision="fp32")


@pytest.mark.skipif(backends.unavailable_reason("onnxruntime") is not None, reason="needs onnxruntime")
def test_optimize_trims_the_cache_to_its_cap_but_keeps_what_its_plan_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    monkeypatch.setenv(cache.ENV_MAX, "1")  # one byte: everything the plan does not run goes
    opt = dioe.optimize(m, (x,), backends=["onnxruntime"], cache_dir=tmp_path, precision="fp32")
    runs = {c.artifact for c in opt.runtime.compiled.values() if c.artifact}
    assert runs, "onnxruntime compiles to a file"
    left = cache.artifacts(tmp_path)
    assert left and all(any(str(p) in runs for p in a.paths) for a in left), \
        "only the artifacts of the plan's own partitions are left"
    assert list((tmp_path / "profiles").iterdir()), "profiles are not artifacts: they stay"
    assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)


def test_cache_command_shows_trims_and_clears(filled, capsys):
    root, files = filled
    assert main(["cache", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "artifacts 3.0 KiB" in out
    assert "onnxruntime  2" in out and "openvino     3" in out
    assert main(["cache", "trim", "--max", "2100", "--cache-dir", str(root)]) == 0
    assert "evicted 1 artifact(s), 1000 B" in capsys.readouterr().out and not files["a"][0].exists()
    assert main(["cache", "trim", "--max", "a lot", "--cache-dir", str(root)]) == 2
    assert "cache size 'a lot' is not a size" in capsys.readouterr().err
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert cache.artifacts(root) == []


def _users_folder(root):
    """A folder that is not DIOE's: someone's project, with folders named like DIOE's."""
    for rel in ("torch/train.py", "onnxruntime/model.onnx", "profiles/run1.json", "notes.txt"):
        _file(root / rel, 100, 1000)
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_clear_and_trim_refuse_a_folder_dioe_did_not_mark(tmp_path, capsys):
    mine = _users_folder(tmp_path)
    for refused in (lambda: cache.clear(tmp_path), lambda: cache.trim(tmp_path, max_bytes=0)):
        with pytest.raises(DIOEError, match=rf"cache folder {tmp_path} has no \.dioe-cache marker file"):
            refused()
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 2
    assert ".dioe-cache marker" in capsys.readouterr().err
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == mine, "nothing of the user's was deleted"
    assert not (tmp_path / integrity.MARKER).exists(), "a folder holding files is not claimed"


@pytest.mark.skipif(backends.unavailable_reason("onnxruntime") is not None, reason="needs onnxruntime")
def test_optimize_into_a_users_folder_keeps_their_files_and_says_it_did_not_trim(tmp_path, monkeypatch):
    mine = _users_folder(tmp_path)
    monkeypatch.setenv(cache.ENV_MAX, "1")  # a cap that would evict every artifact it finds
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 16)
    with pytest.warns(RuntimeWarning, match=r"the cache was not trimmed to its cap: cache folder .* has no "
                                             r"\.dioe-cache marker"):
        opt = dioe.optimize(m, (x,), backends=["onnxruntime"], cache_dir=tmp_path, precision="fp32")
    assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)
    assert all(p.exists() for p in mine), "the user's torch/, onnxruntime/ and profiles/ files are intact"


def test_a_new_or_empty_cache_folder_is_marked_owner_only(tmp_path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "new" / "cache", tmp_path / "empty"):
        cache.usage(root)
        assert (root / integrity.MARKER).is_file()
        assert os.stat(root).st_mode & 0o777 == 0o700 and os.stat(root / integrity.MARKER).st_mode & 0o777 == 0o600
        assert cache.clear(root) == 0 and (root / integrity.MARKER).is_file(), "clear keeps the marker"
