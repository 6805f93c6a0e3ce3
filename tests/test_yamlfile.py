"""The one reader of descriptors and pool files: every unsafe or broken file is a DescriptorError naming the file,
the line and the key, through every entry path (hardware.load, a pool file, hardware=FILE, the CLI)."""

from pathlib import Path

import pytest

from dioe import hardware, pipeline, yamlfile
from dioe.errors import DescriptorError

from helpers import descriptor_check, descriptor_errors

GENERIC = Path(hardware.shipped()["generic-cpu"]).read_text(encoding="utf-8")
AVX512 = Path(hardware.shipped()["x86-64-avx512"]).read_text(encoding="utf-8")


def line_of(text: str, needle: str) -> int:
    return text[:text.index(needle)].count("\n") + 1


def broken(tmp_path, base: str, find: str, replace: str, name: str = "broken.yaml") -> tuple[Path, str]:
    assert find in base, f"test setup: {find!r} not in the base descriptor"
    text = base.replace(find, replace, 1)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path, text


def assert_names(errors: dict, path: Path, line: int, key: str, words: str) -> None:
    for entry, e in errors.items():
        assert (e.file, e.line, e.key) == (str(path), line, key), f"{entry}: {e}"
        assert words in e.message and f"{path}:{line}: {key or '<document>'}: " in str(e), f"{entry}: {e}"


@pytest.mark.parametrize("find,value,key", [
    ("capacity_gb: null", ".inf", "memory.capacity_gb"),
    ("capacity_gb: null", ".nan", "memory.capacity_gb"),
    ("capacity_gb: null", "1.0e+999", "memory.capacity_gb"),
    ("fp32: 0.2", "-.inf", "peak_tflops.fp32"),
    ("latency_us: 0.5", ".NaN", "link.latency_us"),
])
def test_non_finite_numbers_are_refused_before_they_reach_the_pool(tmp_path, find, value, key):
    changed = find.split(":")[0] + ": " + value
    path, text = broken(tmp_path, GENERIC, find, changed)
    assert_names(descriptor_errors(path), path, line_of(text, changed), key, "expected a finite number")


def test_zero_capacity_is_refused_in_descriptors_and_pool_files(tmp_path):
    path, text = broken(tmp_path, GENERIC, "  capacity_gb: null", "  capacity_gb: 0")
    assert_names(descriptor_errors(path), path, line_of(text, "capacity_gb: 0"), "memory.capacity_gb",
                 "expected a number > 0")
    pool = tmp_path / "pool.yaml"
    pool.write_text("pool:\n  - {id: a, descriptor: auto, memory_gb: 0}\n")
    with pytest.raises(DescriptorError) as info:
        pipeline._pool(pool)
    assert (info.value.line, info.value.key) == (2, "pool[0].memory_gb") and "> 0" in info.value.message


@pytest.mark.parametrize("find,replace,line", [
    ("kind: cpu", "kind: [cpu", None),                      # an unclosed flow sequence
    ("  fp32: 0.2", "  fp32: 0.2\n bad: indent", None),     # a key at an indent no mapping has
    ("description: any CPU", 'description: "any CPU', None),  # an unclosed quote
])
def test_yaml_syntax_errors_name_the_file_and_line_through_every_path(tmp_path, find, replace, line):
    path, text = broken(tmp_path, GENERIC, find, replace)
    for entry, e in descriptor_errors(path).items():
        assert e.file == str(path) and e.line and "not valid YAML" in e.message, f"{entry}: {e}"
        assert str(e).startswith(f"{path}:{e.line}: "), f"{entry}: {e}"


def test_truncated_files_name_the_file_line_and_key_through_every_path(tmp_path):
    text = Path(hardware.shipped()["nvidia-h100-80gb"]).read_text(encoding="utf-8")
    cut = text.index("options: {device: cuda}") + len("options: {device: cu")
    path = tmp_path / "cut-in-flow.yaml"
    path.write_text(text[:cut], encoding="utf-8")
    for entry, e in descriptor_errors(path).items():
        assert e.file == str(path) and e.line and "not valid YAML" in e.message, f"{entry}: {e}"
    path = tmp_path / "cut-before-link.yaml"
    path.write_text(text[:text.index("\nlink:") + 1], encoding="utf-8")
    for entry, e in descriptor_errors(path).items():
        assert (e.file, e.key) == (str(path), "link") and e.line and "missing required key" in e.message, e


@pytest.mark.parametrize("find,replace,key", [
    ("kind: cpu", "kind: !!python/object/apply:os.system [echo]", "kind"),
    ("kind: cpu", "kind: !!str cpu", "kind"),
    ("  fp32: 0.2", "  fp32: !!float 0.2", "peak_tflops.fp32"),
    ("vendor: generic", "vendor: !custom generic", "vendor"),
    ("precisions: [fp32]", "precisions: !!set {fp32}", "precisions"),
    ("description: any", "description: !!binary aGVsbG8= #", "description"),
    ("schema_version: 1", "--- !descriptor\nschema_version: 1", ""),
])
def test_yaml_tags_are_refused_not_interpreted(tmp_path, find, replace, key):
    path, text = broken(tmp_path, GENERIC, find, replace)
    assert_names(descriptor_errors(path), path, line_of(text, "!"), key, "explicit YAML tag")


@pytest.mark.parametrize("encode,line", [
    (lambda t: ("# caf\u00e9 latin-1\n" + t).encode("latin-1"), 1),
    (lambda t: t.encode("utf-16"), 1),
    (lambda t: t.replace("vendor: generic", "vendor: gen\udcffric").encode("utf-8", "surrogateescape"),
     line_of(GENERIC, "vendor: generic")),
])
def test_non_utf8_files_are_refused_at_their_line(tmp_path, encode, line):
    path = tmp_path / "encoded.yaml"
    path.write_bytes(encode(GENERIC))
    assert_names(descriptor_errors(path), path, line, "", "not UTF-8")


@pytest.mark.parametrize("find,replace,key", [
    ("precisions: [fp32]", "precisions: &p [fp32, *p]", "precisions[1]"),
    ("match:\n  torch_device: cpu", "match: &m\n  torch_device: cpu\n  again: *m", "match.again"),
])
def test_recursive_aliases_are_refused(tmp_path, find, replace, key):
    path, text = broken(tmp_path, GENERIC, find, replace)
    assert_names(descriptor_errors(path), path, line_of(text, "*"), key, "expected no recursive aliases")


def test_alias_bombs_are_refused(tmp_path):
    # 30 aliases that expand to 30,000 values, in the one free-form place a descriptor has (OpenVINO's config)
    bomb = ("    options:\n      device: CPU\n      config:\n        a: &a [" + ", ".join(["x"] * 30) + "]\n"
            + "".join(f"        {k}: &{k} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
                      for prev, k in (("a", "b"), ("b", "c"))) + "        d: [" + ", ".join(["*c"] * 10) + "]\n")
    path, text = broken(tmp_path, AVX512, "    options: {device: CPU}\n", bomb)
    assert_names(descriptor_errors(path), path, line_of(text, "d: [*c"), "backends[0].options.config.d",
                 f"more than {yamlfile.MAX_NODES:,} values")
    many = "sources:\n  - &s x\n" + "".join("  - *s\n" for _ in range(yamlfile.MAX_ALIASES + 1))
    path, text = broken(tmp_path, GENERIC, "sources:\n", many, "many.yaml")
    line = len(text[:text.index("sources:")].splitlines()) + 2 + yamlfile.MAX_ALIASES + 1
    assert_names(descriptor_errors(path), path, line, f"sources[{yamlfile.MAX_ALIASES + 1}]", "aliases")


def test_a_few_aliases_still_load(tmp_path):
    path, _ = broken(tmp_path, GENERIC, "  fp32: 0.2", "  fp32: &peak 0.2")
    text = path.read_text().replace("sources:\n", "sources:\n  - *peak_note\n").replace(
        "description: any CPU", "description: &peak_note any CPU")
    path.write_text(text)
    d = hardware.load(path)
    assert d.peak_tflops["fp32"] == 0.2 and d.sources[0] == d.description


@pytest.mark.parametrize("find,replace,key,words", [
    ("kind: cpu", "kind: cpu\nyes: 1", "", "not a plain string"),
    ("kind: cpu", "kind: cpu\n? [a, b]\n: 1", "", "not a plain string"),
    ("vendor: generic", "vendor: 2024-13-45", "vendor", "cannot be read as YAML timestamp"),
    ("  fp32: 0.2", "  fp32: " + "9" * 5000, "peak_tflops.fp32", "cannot be read as YAML int"),
    ("  fp32: 0.2", "  fp32: " + "9" * 400, "peak_tflops.fp32", "expected a finite number"),
])
def test_scalars_and_keys_python_cannot_build_are_refused(tmp_path, find, replace, key, words):
    path, text = broken(tmp_path, GENERIC, find, replace)
    line = line_of(text, replace.splitlines()[-1] if key else replace.splitlines()[1])
    assert_names(descriptor_errors(path), path, line, key, words)


@pytest.mark.parametrize("find,replace,words", [
    ("kind: cpu", "kind: !!python/name:os.system cpu", "explicit YAML tag"),
    ("precisions: [fp32]", "precisions: &p [fp32, *p]", "recursive aliases"),
    ("kind: cpu", "kind: [cpu", "not valid YAML"),
    ("  capacity_gb: null", "  capacity_gb: .inf", "finite"),
])
def test_descriptor_check_prints_the_error_without_a_traceback(tmp_path, capsys, find, replace, words):
    path, _ = broken(tmp_path, GENERIC, find, replace)
    code, out = descriptor_check(path, capsys)
    assert code == 1 and f"error {path}:" in out and words in out and "Traceback" not in out, out
    from dioe import cli

    assert cli.main(["devices", "--hardware", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dioe devices: error: {path}:") and words in err, err


def test_descriptor_check_passes_a_good_file(tmp_path, capsys):
    path, _ = broken(tmp_path, GENERIC, "name: generic-cpu", "name: mine")
    code, out = descriptor_check(path, capsys)
    assert code == 0 and out.startswith(f"ok    {path} (mine)"), out


def test_a_broken_descriptor_in_a_pool_is_named_with_the_member_that_uses_it(tmp_path):
    path, text = broken(tmp_path, GENERIC, "kind: cpu", "kind: !!str cpu")
    e = descriptor_errors(path)["pool file"]
    assert "the descriptor of member 'm'" in e.message and f"pool-of-{path.stem}.yaml:2" in e.message, e
    pool = tmp_path / "pool.yaml"
    pool.write_text("pool:\n  - {id: a, descriptor: auto}\n  - {id: b, descriptor: nowhere.yaml}\n")
    with pytest.raises(DescriptorError) as info:
        pipeline._pool(pool)
    assert (info.value.file, info.value.line, info.value.key) == (str(pool), 3, "pool[1].descriptor")


def test_hardware_of_the_wrong_type_is_a_clear_error():
    from dioe.errors import DIOEError

    with pytest.raises(DIOEError, match="hardware must be 'auto', a descriptor name or path"):
        pipeline._pool(42)
    with pytest.raises(DescriptorError, match="expected a shipped descriptor name or a path to a YAML file"):
        pipeline._pool([42])
