"""Cached artifacts are checked before they run: a damaged file (flipped bytes, a truncated write) is deleted with a
warning and built again, never run in place of the model; cache files are the owner's alone."""

import stat
import time
import warnings
from pathlib import Path

import pytest
import torch

import dioe
from dioe import backends

from helpers import assert_matches_eager, eager

# where each engine keeps the weights of the model file a compiled partition names as its artifact
WEIGHTS = {"onnxruntime": lambda model: model.with_name(model.name + ".data"),
           "openvino": lambda model: model.with_suffix(".bin")}


def _needs(backend):
    return pytest.mark.skipif(backends.unavailable_reason(backend) is not None, reason=f"needs {backend}")


def _optimize(model, inputs, backend, cache_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dioe.optimize(model, inputs, backends=[backend], cache_dir=cache_dir, precision="fp32")


def _weights(opt, backend) -> Path:
    (compiled,) = opt.runtime.compiled.values()
    assert compiled.backend == backend and compiled.artifact, "the plan runs one partition on the engine's file"
    weights = WEIGHTS[backend](Path(compiled.artifact))
    assert weights.stat().st_size >= 1024, f"{weights} holds the weights"
    return weights


def _flip(path: Path, n: int = 64) -> None:
    """Invert `n` bytes in the middle of `path`: same size, other content."""
    time.sleep(0.05)  # a file's time moves in clock ticks of a few ms: the change shows in it, as any later one does
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def _runs_as_planned(opt, backend):
    assert {c.backend for c in opt.runtime.compiled.values()} == {backend}, "rebuilt, not fallen back to torch"
    assert {p.backend for p in opt.plan.partitions} == {backend}, "the plan names the engine that runs"


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_needs(b)) for b in WEIGHTS])
def test_flipped_weights_are_caught_by_load_and_by_the_next_optimize(backend, tmp_path):
    torch.manual_seed(0)
    model, inputs = dioe.zoo.load("tiny-mlp")
    want = eager(model, inputs)
    cache_dir = tmp_path / "cache"
    opt = _optimize(model, inputs, backend, cache_dir)
    weights = _weights(opt, backend)
    opt.save(tmp_path / "plan.json")
    opt.runtime.close()

    _flip(weights)
    with pytest.warns(RuntimeWarning, match=rf"{weights.name}.*differs from the manifest's .*building it again"):
        loaded = dioe.load(tmp_path / "plan.json", model, inputs, cache_dir=cache_dir)
    assert_matches_eager(want, loaded(*inputs), rtol=1e-4, what=f"dioe.load after {weights.name} was damaged")
    _runs_as_planned(loaded, backend)
    loaded.runtime.close()

    _flip(weights)
    with pytest.warns(RuntimeWarning, match=rf"{weights.name}.*differs from the manifest's"):
        again = dioe.optimize(model, inputs, backends=[backend], cache_dir=cache_dir, precision="fp32")
    assert_matches_eager(want, again(*inputs), rtol=1e-4, what="the next optimize")
    _runs_as_planned(again, backend)
    again.runtime.close()


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_needs(b)) for b in WEIGHTS])
def test_a_truncated_artifact_is_rebuilt_and_the_plan_names_the_engine_that_runs(backend, tmp_path):
    torch.manual_seed(0)
    model, inputs = dioe.zoo.load("tiny-mlp")
    cache_dir = tmp_path / "cache"
    first = _optimize(model, inputs, backend, cache_dir)
    weights = _weights(first, backend)
    first.runtime.close()
    with open(weights, "r+b") as f:  # what a crash part way through a plain write leaves
        f.truncate(weights.stat().st_size // 2)

    with pytest.warns(RuntimeWarning, match=rf"{weights.name} has \d+ bytes, the manifest says \d+"):
        opt = dioe.optimize(model, inputs, backends=[backend], cache_dir=cache_dir, precision="fp32")
    _runs_as_planned(opt, backend)
    assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)
    from dioe import integrity

    (compiled,) = opt.runtime.compiled.values()
    assert integrity.damage(Path(compiled.artifact)) is None, "the rebuilt artifact is whole and sealed"
    opt.runtime.close()


@_needs("onnxruntime")
@_needs("openvino")
def test_cache_files_are_the_owners_alone(tmp_path):
    torch.manual_seed(0)
    model, inputs = dioe.zoo.load("tiny-mlp")
    root = tmp_path / "cache"
    for backend in WEIGHTS:
        _optimize(model, inputs, backend, root).runtime.close()
    found = [root, *root.rglob("*")]
    assert {p.name for p in found} >= {"onnxruntime", "openvino", "blobs", "profiles", ".dioe-cache"}
    blobs = {p for p in found if p.is_file() and "blobs" in p.relative_to(root).parts}
    assert any(p.suffix == ".blob" for p in blobs), "OpenVINO's own blobs are checked too"
    assert any(p.suffix == ".onnx" for p in found) and any(p.name.endswith(".race.json") for p in found)
    # DIOE's files are 0600; OpenVINO's blobs keep their owner's read-only bits (0400)
    loose = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in found
             if stat.S_IMODE(p.stat().st_mode) not in ((0o700,) if p.is_dir() else
                                                       (0o600, 0o400) if p in blobs else (0o600,))}
    assert not loose, f"folders must be 0700 and files 0600: {loose}"


@_needs("openvino")
def test_a_flipped_openvino_blob_is_deleted_and_compiled_again_not_run(tmp_path):
    torch.manual_seed(0)
    model, inputs = dioe.zoo.load("tiny-mlp")
    want = eager(model, inputs)
    cache_dir = tmp_path / "cache"
    opt = _optimize(model, inputs, "openvino", cache_dir)
    opt.save(tmp_path / "plan.json")
    opt.runtime.close()
    # a model read back from its IR hashes apart from the one just converted: this load writes the blob that the
    # next one reads from OpenVINO's cache
    dioe.load(tmp_path / "plan.json", model, inputs, cache_dir=cache_dir).runtime.close()
    blobs = sorted((cache_dir / "openvino" / "blobs").rglob("*.blob"))
    assert blobs, "OpenVINO cached its compiled blobs"
    for blob in blobs:
        blob.chmod(0o600)  # OpenVINO leaves them read-only
        _flip(blob)  # same size, other weights: OpenVINO would load this blob and run it

    with pytest.warns(RuntimeWarning, match=r"cached OpenVINO compiled blob .*\.blob is damaged: .*\.blob's sha256 "
                                            r"differs from the manifest's .*building it again"):
        loaded = dioe.load(tmp_path / "plan.json", model, inputs, cache_dir=cache_dir)
    assert_matches_eager(want, loaded(*inputs), rtol=1e-4, what="dioe.load after its OpenVINO blob was damaged")
    _runs_as_planned(loaded, "openvino")
    (compiled,) = loaded.runtime.compiled.values()
    loaded.runtime.close()
    from dioe import integrity

    # the blobs of the IR the plan runs (the other partitions' blobs were not read, so not checked)
    folder = cache_dir / "openvino" / "blobs" / Path(compiled.artifact).name.removesuffix(".xml")
    rebuilt = sorted(folder.glob("*.blob"))
    assert rebuilt and all(integrity.damage(b) is None for b in rebuilt), "the blob compiled again is sealed"


def test_a_seal_catches_flipped_and_missing_files_and_a_damaged_artifact_is_deleted(tmp_path):
    from dioe import integrity

    model = tmp_path / "d.onnx"
    model.write_bytes(b"graph")
    (tmp_path / "d.onnx.data").write_bytes(bytes(4096))
    integrity.seal(model, [tmp_path / "d.onnx.data"])
    assert integrity.damage(model) is None
    _flip(tmp_path / "d.onnx.data", 1)
    assert integrity.damage(model) == \
        "d.onnx.data's sha256 differs from the manifest's (same size: its content changed)"
    with pytest.warns(RuntimeWarning, match=r"cached artifact .*d\.onnx is damaged: d\.onnx\.data's sha256"):
        assert not integrity.reusable(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "model, weights and manifest are gone"

    model.write_bytes(b"graph")
    assert "no manifest" in integrity.damage(model), "a file never sealed (a crash before its seal) is not trusted"
    integrity.seal(model)
    model.unlink()
    assert not integrity.reusable(model), "nothing there: build it, quietly"
