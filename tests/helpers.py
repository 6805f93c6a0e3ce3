"""Helpers shared by the tests: one way to say 'this matches eager'."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import torch
import torch.utils._pytree as pytree


def dioe_command() -> list[str]:
    """The installed `dioe` console script, run as a user would. Not `python -m dioe.cli`: from the repository
    root that imports the source folder `dioe/`, which lacks `dioe.backends` (installed from `backends/`)."""
    beside = Path(sys.executable).with_name("dioe")
    found = str(beside) if beside.exists() else shutil.which("dioe")
    assert found, "the dioe console script is not installed: pip install -c constraints.txt '.[all]'"
    return [found]


def max_rel_error(expected, actual) -> float:
    """Largest |a - e| / max|e| over all tensor leaves (max|e| floored so all-zero outputs compare absolutely); a
    NaN where the other has a number is an infinite error."""
    worst = 0.0
    for e, a in zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual)):
        if not isinstance(e, torch.Tensor):
            continue
        e, a = e.detach().double().cpu(), a.detach().double().cpu()
        if e.numel() and not torch.equal(e.isnan(), a.isnan()):
            return float("inf")  # a NaN compares false with everything: max() would pass over it
        scale = max(e.abs().max().item(), 1e-6) if e.numel() else 1.0
        worst = max(worst, ((a - e).abs().max().item() / scale) if e.numel() else 0.0)
    return worst


def assert_matches_eager(expected, actual, *, rtol: float = 1e-5, what: str = "") -> None:
    """Same structure (types, keys, lengths), same shapes and dtypes, values within `rtol` of the largest value."""
    e_leaves, e_spec = pytree.tree_flatten(expected)
    a_leaves, a_spec = pytree.tree_flatten(actual)
    assert type(actual) is type(expected), f"{what}: output type {type(actual).__name__} != {type(expected).__name__}"
    assert e_spec == a_spec, f"{what}: output structure differs:\n{e_spec}\nvs\n{a_spec}"
    if dataclasses.is_dataclass(expected) and hasattr(expected, "keys"):
        assert list(expected.keys()) == list(actual.keys()), f"{what}: keys differ"
    for i, (e, a) in enumerate(zip(e_leaves, a_leaves)):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{what}: output {i} is {type(a).__name__}, expected a tensor"
            assert a.shape == e.shape, f"{what}: output {i} shape {tuple(a.shape)} != {tuple(e.shape)}"
            assert a.dtype == e.dtype, f"{what}: output {i} dtype {a.dtype} != {e.dtype}"
        else:
            assert a == e, f"{what}: output {i} {a!r} != {e!r}"
    err = max_rel_error(expected, actual)
    assert err <= rtol, f"{what}: relative error {err:.2e} exceeds {rtol:.0e}"


def eager(model, inputs, kwargs=None):
    with torch.inference_mode():
        return model(*inputs, **(kwargs or {}))


class DictAndTuple(torch.nn.Module):
    """Two inputs; a dict output holding a tuple that holds a list."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, x, y):
        h = torch.relu(self.a(x)) + y
        return {"logits": self.b(h), "extra": (h.mean(), [h * 2])}


class Branches(torch.nn.Module):
    """Two heavy independent branches: enough work per branch (~tens of ms) for overlap to be visible."""

    def __init__(self, d=768):
        super().__init__()
        self.left = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(6)])
        self.right = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(6)])
        self.head = torch.nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.left(x) + self.right(x))


def branches_on_two_members(standin_pool):
    """Branches compiled under a hand-written plan: left on cpu (ONNX Runtime), right on the stand-in cpu-b
    (ONNX Runtime), head on cpu (torch). Returns (model, input, optimized)."""
    import dioe
    from dioe.build import build
    from dioe.plan import Plan, PlanPartition

    torch.manual_seed(0)
    m, x = Branches().eval(), torch.randn(256, 768)
    g = dioe.capture(m, (x,))
    where = {}
    for n in g.compute_nodes:
        mod = n.meta["dioe.module"]
        where[n.name] = "left" if mod.startswith("left") else ("right" if mod.startswith("right") else "head")
    parts = []
    for pid, member, backend in [("left", "cpu", "onnxruntime"), ("right", "cpu-b", "onnxruntime"),
                                 ("head", "cpu", "torch")]:
        nodes = tuple(n for n, p in where.items() if p == pid)
        parts.append(PlanPartition(pid, (pid,), nodes, member, backend, "fp32", len(nodes), 0.0, 1.0))
    plan = Plan("Branches", g.structure_hash(), "", "latency", tuple(parts), 1.0)
    return m, x, build(g, plan, standin_pool, objective="latency")


def one_partition_plan(captured, member_id: str, backend: str, precision: str = "fp32", *, fingerprint: str = ""):
    """A plan that runs every node of `captured` as one partition on `member_id` with `backend`."""
    from dioe.plan import Plan, PlanPartition

    nodes = tuple(n.name for n in captured.compute_nodes)
    return Plan(captured.name, captured.structure_hash(), fingerprint, "latency",
                (PlanPartition("p0", ("p0",), nodes, member_id, backend, precision, len(nodes), 0.0, 1.0),), 1.0,
                inputs=tuple(s.to_dict() if s else {} for s in captured.input_specs))


def one_partition(model, inputs, member, backend):
    """`model` built under a plan of one partition on `member` and `backend`, with no profiling or race."""
    import dioe
    from dioe.build import build

    g = dioe.capture(model, inputs, name="M")
    return build(g, one_partition_plan(g, member.id, backend), dioe.ResourcePool.discover(), objective="latency")


def five_layers():
    """A small chain (Linear, GELU, Linear, GELU, Linear) and its input: several segments, quick to optimize."""
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 8)).eval(), torch.randn(4, 32)


def force_split(monkeypatch, member_id: str) -> dict:
    """Make optimize() plan segments alternately on onnxruntime and torch at `member_id`: a plan of several
    partitions, predicted well ahead of any one engine over the whole graph, so that it is built and raced: at
    most half the best whole-graph option, not just half the assignment's own sum. On a busy machine the live
    profile once put ONNX Runtime's whole graph below that, so the split was never built and had no such rival.
    Returns {"predicted_ms": ...}, the last split's forecast, for a test that scripts its measurement."""
    import dataclasses

    import dioe.partition
    from dioe.plan import Choice

    real_assign, forced = dioe.partition.assign, {}

    def split(segments, edges, profile, pool):
        got = real_assign(segments, edges, profile, pool)
        opts = {s.id: Choice(member_id, "torch" if i % 2 else "onnxruntime") for i, s in enumerate(segments)}
        best = min((ms for _, ms in dioe.partition.whole_graph_options(segments, profile, pool)),
                   default=got.predicted_ms)
        forced["predicted_ms"] = min(got.predicted_ms, best) / 2
        return dataclasses.replace(got, options=opts, predicted_ms=forced["predicted_ms"])
    monkeypatch.setattr(dioe.partition, "assign", split)
    return forced


def prediction_holds(monkeypatch, forced: dict) -> None:
    """Script the measure step's timing of a plan (`dioe.timing.time_call`) to come out at the forced split's
    forecast, so that optimize() does not re-plan it: what the race then does is the test's, not the machine's."""
    import dioe.timing
    from dioe.text import round_ms

    monkeypatch.setattr(dioe.timing, "time_call", lambda fn, *a, **k: round_ms(forced["predicted_ms"]))


def descriptor_errors(path: Path) -> dict:
    """The DescriptorError each entry path that reads a descriptor file raises for the file at `path`:
    `dioe.hardware.load`, a pool file naming it (beside it), and hardware=FILE, which `optimize`, `dioe.load` and
    `dioe devices --hardware` resolve through `dioe.pipeline._pool`. Fails where a path accepts the file or
    raises anything else."""
    from dioe import hardware, pipeline
    from dioe.errors import DescriptorError

    pool_file = path.parent / f"pool-of-{path.stem}.yaml"
    pool_file.write_text(f"pool:\n  - {{id: m, descriptor: '{path.name}', stand_in: true}}\n", encoding="utf-8")
    entries = {"hardware.load": lambda: hardware.load(path), "pool file": lambda: pipeline._pool(pool_file),
               "hardware=FILE": lambda: pipeline._pool(path)}
    errors = {}
    for name, call in entries.items():
        try:
            call()
        except DescriptorError as e:
            errors[name] = e
        except Exception as e:
            raise AssertionError(f"{path} through {name}: {type(e).__name__} instead of a DescriptorError: "
                                 f"{e}") from e
        else:
            raise AssertionError(f"{path} through {name}: accepted; expected a DescriptorError")
    return errors


def descriptor_check(path: Path, capsys) -> tuple[int, str]:
    """`dioe descriptor check PATH` in this process: its exit code and everything it printed."""
    from dioe import cli

    code = cli.main(["descriptor", "check", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def script_int8_faster(monkeypatch, factor: float = 0.5) -> None:
    """Make every int8 contender win the side-by-side timing: its rounds become `factor` times the fastest round of
    any other contender, so the winner never depends on the load the machine is under. Accuracy stays real."""
    from dioe import timing

    real = timing.side_by_side

    def scripted(runs, flat, **kw):
        got = real(runs, flat, **kw)
        others = [t for k, v in got.items() if "/int8" not in k for t in v]
        fastest = min(others) if others else min(t for v in got.values() for t in v)
        return {k: [factor * fastest] * len(v) if "/int8" in k else v for k, v in got.items()}
    monkeypatch.setattr(timing, "side_by_side", scripted)


class Block(torch.nn.Module):
    """relu(fc(x * scale)) + x. With `outlier`, one input channel is scaled 1000x up and its weights 1000x down:
    the same kind of function, but the activation's range is 1000x wider than its other channels, so a per-tensor
    int8 scale crushes them."""

    def __init__(self, d: int, outlier: bool = False, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.fc = torch.nn.Linear(d, d)
        scale = torch.ones(d)
        if outlier:
            scale[0] = 1000.0
            with torch.no_grad():
                self.fc.weight[:, 0] /= 1000.0
        self.register_buffer("scale", scale)

    def forward(self, x):
        y = torch.relu(self.fc(x * self.scale))
        return y + x if self.residual else y


def outlier_model(residual: bool = True, outlier: int | None = 2):
    """Four blocks and a head, block `outlier` with a channel of 1000x the others' range: int8 over the whole
    graph misses a cosine budget of 0.999, and a mix that keeps that block's part fp32 meets it. (model, example
    input, 64 calibration inputs)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block(64, outlier=i == outlier, residual=residual) for i in range(4)],
                                torch.nn.Linear(64, 8)).eval()
    return model, torch.randn(2, 64), [(torch.randn(2, 64),) for _ in range(64)]
