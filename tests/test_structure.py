"""The package's shape: imports go downward only, and a backend is one file that declares what the rest reads."""

import ast
import warnings
from pathlib import Path

import pytest
import torch

import dioe
from dioe import backends
from dioe.backend import Backend

PACKAGE = Path(dioe.__file__).parent
EDGES = {"cli", "bench", "dynamo"}   # the ways in: they import the core, never the reverse


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The dioe modules a file imports ("plan", "backends", ...), at module level or anywhere in it."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def _core_modules() -> dict[str, Path]:
    return {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_no_core_module_imports_the_cli_or_the_bench():
    for name, path in _core_modules().items():
        if name in EDGES:
            continue
        wrong = _imports(path, top_level_only=False) & EDGES
        assert not wrong, f"dioe/{name}.py imports {wrong}: the core must not depend on its own users"


def test_module_level_imports_form_no_cycle():
    graph = {name: _imports(path, top_level_only=True) & set(_core_modules())
             for name, path in _core_modules().items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) != 2:
            state[m] = 1
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = 2
    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("name", backends.names())
def test_each_backend_declares_what_the_rest_reads(name):
    cls = backends.backend_class(name)
    assert issubclass(cls, Backend) and cls.name == name
    assert cls.color.startswith("#") and cls.color != Backend.color, "its colour in traces and charts"
    assert cls.precisions and "fp32" in cls.precisions
    assert isinstance(cls.options, frozenset) and isinstance(cls.thread_budget, bool)


def test_trace_colours_and_descriptor_options_come_from_the_backend_files():
    from dioe import hardware
    from dioe.tracereport import backend_colors

    assert {b: c for b, c in backend_colors().items() if b != "copy"} == \
        {b: backends.backend_class(b).color for b in backends.names()}
    text = (Path(hardware._shipped_dir()) / "generic-cpu.yaml").read_text()
    assert "name: torch" in text
    bad = text.replace("name: torch", "name: torch\n    options: {mode: max-autotune}", 1)
    with pytest.raises(dioe.DescriptorError, match=r"not an option of backend 'torch'; expected one of: device"):
        hardware.parse(bad, "generic-cpu.yaml")


@pytest.mark.skipif(torch.get_num_threads() == 1, reason="torch's pool is one thread: every budget of 1 is kept")
def test_a_plan_says_where_torch_ignores_a_member_thread_budget(standin_pool, tmp_path):
    model = dioe.zoo.TinyMLP().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, (torch.randn(2, 64),), hardware=standin_pool, backends=["torch"],
                            settings=dioe.Settings(cache_dir=tmp_path), precision="fp32")
    from dioe.planner import thread_budget_gaps

    gaps = thread_budget_gaps(standin_pool, opt.plan.partitions)
    members = {p.member for p in opt.plan.partitions}
    assert gaps == {m: (("torch",), 1) for m in members}, "every member of the pool file has a budget of 1"
    told = [n for n in opt.plan.notes if n.startswith("thread budget: ")]
    assert len(told) == len(members) and all(f"on {m}, torch run" in " ".join(told) for m in members), told


def test_setup_installs_every_subpackage():
    """A subpackage missing from setup.py's list works in an editable install and is absent from a real one."""
    root = Path(__file__).resolve().parent.parent   # the source tree, wherever dioe is installed from
    setup = (root / "setup.py").read_text()
    listed = ast.literal_eval(setup.split("packages=", 1)[1].split("]", 1)[0] + "]")
    found = {"dioe." + p.parent.name for p in (root / "dioe").glob("*/__init__.py")} | {"dioe"}
    assert found <= set(listed), f"setup.py's packages lack {sorted(found - set(listed))}"
