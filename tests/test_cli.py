"""The dioe command line, run as a user would: as a subprocess of the installed console script."""

import json
import subprocess

from helpers import dioe_command


def run(*args, check=True):
    cmd = dioe_command() + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def test_devices_table_and_json():
    out = run("devices").stdout
    assert "cpu0" in out and "member" in out
    data = json.loads(run("devices", "--json").stdout)
    assert data["members"][0]["device"] == "cpu"
    assert data["members"][0]["descriptor"]


def test_devices_with_a_pool_file():
    from conftest import POOLS

    out = run("devices", "--hardware", str(POOLS / "standin.yaml")).stdout
    assert "[stand-in]" in out and "npu" in out


def test_capture_summary():
    out = run("capture", "tiny-bert", "--top", "3").stdout
    assert "aten.linear" in out and "FLOPs share" in out and "heaviest 3 nodes" in out


def test_capture_of_a_user_function(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Linear(3, 2), (torch.randn(1, 3),)\n")
    p = subprocess.run(dioe_command() + ["capture", "mymodels:build", "--json"], capture_output=True, text=True,
                       cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["nodes"] == 1


def test_unknown_model_is_a_clear_error():
    p = run("capture", "alexnet", check=False)
    assert p.returncode == 2
    assert "unknown zoo model 'alexnet'" in p.stderr and "bert-base" in p.stderr
    assert "Traceback" not in p.stderr


def test_descriptor_check_reports_file_line_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: cpu\nfoo: 1\n")
    p = run("descriptor", "check", str(bad), check=False)
    assert p.returncode == 1
    assert f"{bad}:3: foo: unknown key" in p.stdout
    assert run("descriptor", "check").returncode == 0
