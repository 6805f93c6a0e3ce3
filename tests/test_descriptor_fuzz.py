"""Fuzzing the descriptor reader: well over a thousand broken descriptors, made from the shipped ones by a seeded
generator, each rejected with a DescriptorError that names the file (and the line and key where the kind of
breakage has them) through every entry path, and through `dioe descriptor check` for a sample."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Union

import yaml

from dioe import hardware, yamlfile
from dioe.schema import dotted

from helpers import descriptor_check, descriptor_errors

SHIPPED = {name: p.read_text(encoding="utf-8") for name, p in hardware.shipped().items()}
REQUIRED_TOP = [f.name for f in dataclasses.fields(hardware.Descriptor)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # PyYAML itself is the oracle here: its fast build
PER_KIND = 7  # cases per kind of breakage per shipped descriptor; 12 kinds x 13 descriptors x 7 > 1,000


@dataclass
class Case:
    kind: str
    base: str
    content: bytes
    words: str                  # in the error's message
    line: int | None = None     # the line the error must name; None: any line
    key: str | None = None      # the key the error must name; None: not checked (syntax, encodings, cuts)


# -- the schema, walked over a document, tells each value's type and bounds ---------------------------------------

def values(tp: Any, value: Any, path: tuple = (), meta: Mapping | None = None):
    """(path, type hint, field metadata) of every value present in `value`, read against the type hint `tp`."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or len(arms) != 1:
            return
        tp, origin = arms[0], typing.get_origin(arms[0])
    yield path, tp, meta
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            if f.init and f.name in value:
                yield from values(hints[f.name], value[f.name], path + (f.name,), f.metadata)
    elif origin is tuple and isinstance(value, list):
        for i, v in enumerate(value):
            yield from values(typing.get_args(tp)[0], v, path + (i,))
    elif origin is not None and origin is not Literal and issubclass(origin, Mapping) and isinstance(value, dict):
        if typing.get_args(tp)[1] is not Any:
            for k, v in value.items():
                yield from values(typing.get_args(tp)[1], v, path + (k,), meta)


def get(data: Any, path: tuple) -> Any:
    for p in path:
        data = data[p]
    return data


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, allow_unicode=True,
                     width=1000)


def line_of(text: str, path: tuple) -> int:
    """The line the reader should name for `path`: its key's line, or its nearest ancestor's (PyYAML as oracle)."""
    node = yaml.compose(text, Loader=LOADER)
    line = node.start_mark.line + 1
    for p in path:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == p), None)
            if pair is None:
                return line
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(p, int) and p < len(node.value):
            node = node.value[p]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# -- breakage made on the data, then written out ------------------------------------------------------------------

WRONG = {str: [[1, 2], {"k": 1}, 7, 2.5, True], float: [[1, 2], {"k": 1}, "fast", True, "12 GB"],
         int: [[1, 2], {"k": 1}, "many", 2.5, True], bool: [[1, 2], {"k": 1}, "maybe", 7, 2.5],
         "list": [{"k": 1}, "text", 7, True], "mapping": [[1, 2], "text", 7, True]}


def _shape(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return str
    if origin is tuple:
        return "list"
    if dataclasses.is_dataclass(tp) or (origin is not None and issubclass(origin, Mapping)):
        return "mapping"
    return tp if tp in WRONG else None


def data_cases(name: str, rng: random.Random) -> list[Case]:
    data = yaml.load(SHIPPED[name], Loader=LOADER)
    present = list(values(hardware.Descriptor, data))
    structs = [p for p, tp, _ in present if dataclasses.is_dataclass(tp)]
    out: list[Case] = []

    def case(kind: str, changed: Any, path: tuple, words: str) -> Case:
        text = dump(changed)
        return Case(kind, name, text.encode(), words, line_of(text, path), dotted(path))

    for _ in range(PER_KIND):
        # unknown keys, at any level a dataclass reads
        d, at = copy.deepcopy(data), rng.choice(structs)
        key = rng.choice(["flavour", "bandwith_gbps", "threads_per_core", "Name", "extra", "x-note"]) + \
            f"_{rng.randrange(100)}"
        get(d, at)[key] = rng.choice([1, "two", [3], {"four": 4}, None])
        out.append(case("unknown key", d, at + (key,), "unknown key"))
        # wrong types
        path, tp, _ = rng.choice([v for v in present if v[0] and _shape(v[1])])
        d = copy.deepcopy(data)
        get(d, path[:-1])[path[-1]] = rng.choice(WRONG[_shape(tp)])
        out.append(case("wrong type", d, path, "expected"))
        # numbers that are not finite
        path, _, _ = rng.choice([v for v in present if v[1] is float])
        d = copy.deepcopy(data)
        get(d, path[:-1])[path[-1]] = rng.choice([math.inf, -math.inf, math.nan])
        out.append(case("non-finite number", d, path, "expected a finite number"))
        # sizes, speeds and counts that are not positive (or negative where zero is allowed)
        bounded = [v for v in present if v[1] in (float, int) and (v[2].get("gt") is not None
                                                                  or v[2].get("ge") is not None)]
        bounded += [(("memory", "capacity_gb"), float, {"gt": 0})] if "memory" in data else []
        path, tp, meta = rng.choice(bounded)
        d = copy.deepcopy(data)
        bad = [0, -1, -0.5, -1e9] if meta.get("gt") is not None else [-1, -0.25, -1e9]
        get(d, path[:-1])[path[-1]] = tp(rng.choice(bad))
        out.append(case("non-positive number", d, path, "expected a number >"))
        # missing required keys
        required = [(at, f.name) for at in structs for f in dataclasses.fields(get_type(at))
                    if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                    and f.name in get(data, at)]
        at, key = rng.choice(required)
        d = copy.deepcopy(data)
        del get(d, at)[key]
        text = dump(d)
        out.append(Case("missing key", name, text.encode(), "missing required key", line_of(text, at),
                        dotted(at + (key,))))
        # bad enum values, and keys of mappings keyed by an enum
        enums = [v for v in present if typing.get_origin(v[1]) is Literal]
        d = copy.deepcopy(data)
        if rng.random() < 0.25:
            k = next(iter(d["peak_tflops"]))
            bad_key = rng.choice(["fp64", "FP32", "int2", "float"])
            d["peak_tflops"] = {(bad_key if x == k else x): v for x, v in d["peak_tflops"].items()}
            out.append(case("bad enum", d, ("peak_tflops", bad_key), "expected one of"))
        else:
            path, tp, _ = rng.choice(enums)
            bad = rng.choice(["tpu", "fp64", "quantum", "CPU", "Torch", "", "auto-magic"])
            assert bad not in typing.get_args(tp)
            get(d, path[:-1])[path[-1]] = bad
            out.append(case("bad enum", d, path, "expected one of"))
    return out


def get_type(path: tuple) -> Any:
    tp = hardware.Descriptor
    for p in path:
        if isinstance(p, int):
            tp = typing.get_args(tp)[0]
        else:
            tp = typing.get_type_hints(tp)[p]
            arms = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = arms[0] if typing.get_origin(tp) in (Union, types.UnionType) else tp
    return tp


# -- breakage made on the text and the bytes ----------------------------------------------------------------------

KEY_LINE = re.compile(r"^(\s*(?:- )?)([A-Za-z_][\w]*):(\s*)(\S.*)?$")


def key_lines(text: str) -> dict[int, tuple]:
    """Line (1-based) -> key path, for every key of the document (PyYAML as oracle)."""
    out: dict[int, tuple] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                out.setdefault(k.start_mark.line + 1, path + (k.value,))
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    walk(yaml.compose(text, Loader=LOADER), ())
    return out


BAD_YAML = ["{", "[", "]", "key: [1, 2", "'unclosed", '"unclosed', "@reserved", "`tick", "- item", "a: b: c",
            "\t\tindented: with tabs", "? ", "%YAML 1.1", "&", "*", ": value", "}", "key: &", "!!"]
TAGS = ["!!str", "!!python/object/apply:os.system", "!!python/name:builtins.eval", "!!binary", "!custom", "!",
        "!!int", "!!float", "!!map", "!<tag:yaml.org,2002:str>", "!!timestamp", "!!set"]
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88"]
CONTROL = ["\x00", "\x07", "\x1b", "\x7f", "\x0c"]


def text_cases(name: str, rng: random.Random) -> list[Case]:
    text = SHIPPED[name]
    lines = text.splitlines(keepends=True)
    keyed = key_lines(text)
    tag_lines = [i for i, s in enumerate(lines) if (m := KEY_LINE.match(s.rstrip("\n"))) and m.group(4)
                 and not m.group(4).startswith("#") and i + 1 in keyed]
    block_parents = [i for i, s in enumerate(lines[:-1]) if KEY_LINE.match(s.rstrip("\n"))
                     and not KEY_LINE.match(s.rstrip("\n")).group(4) and i + 1 in keyed
                     and lines[i + 1].strip() and not lines[i + 1].lstrip().startswith("#")]
    block_keys = [n - 1 for n in sorted(keyed) if (m := KEY_LINE.match(lines[n - 1].rstrip("\n")))
                  and not ("-" in m.group(1) and m.group(4) is None)]
    last_required = max(text.index(f"\n{k}:") + 1 for k in REQUIRED_TOP)
    out: list[Case] = []
    for _ in range(PER_KIND):
        # YAML that does not parse (PyYAML itself is the oracle that it is broken)
        while True:
            at = rng.randrange(len(lines) + 1)
            broken = "".join(lines[:at]) + rng.choice(BAD_YAML) + "\n" + "".join(lines[at:])
            try:
                yaml.compose(broken, Loader=LOADER)
            except yaml.YAMLError:
                break
        out.append(Case("bad YAML", name, broken.encode(), "not valid YAML"))
        # a key given twice, in the same mapping: a block-valued key's first copy goes before it, with a null value
        i = rng.choice(block_keys)
        m = KEY_LINE.match(lines[i].rstrip("\n"))
        if m.group(4) is None:
            dup = lines[:i] + [lines[i].rstrip("\n") + " null\n"] + lines[i:]
        else:
            dup = lines[:i + 1] + [lines[i].replace("- ", "  ", 1) if "-" in m.group(1) else lines[i]] + lines[i + 1:]
        out.append(Case("duplicate key", name, "".join(dup).encode(), "duplicate key", i + 2, dotted(keyed[i + 1])))
        # explicit tags, on any value
        i = rng.choice(tag_lines)
        m = KEY_LINE.match(lines[i].rstrip("\n"))
        tagged = f"{m.group(1)}{m.group(2)}:{m.group(3)}{rng.choice(TAGS)} {m.group(4)}\n"
        out.append(Case("tag", name, "".join(lines[:i] + [tagged] + lines[i + 1:]).encode(), "explicit YAML tag",
                        i + 1, dotted(keyed[i + 1])))
        # encodings: stray bytes that are not UTF-8, whole files in another encoding, control characters
        raw = text.encode()
        r = rng.random()
        if r < 0.5:
            at = rng.randrange(len(raw) + 1)
            out.append(Case("encoding", name, raw[:at] + rng.choice(INVALID_UTF8) + raw[at:], "not UTF-8",
                            raw.count(b"\n", 0, at) + 1, ""))
        elif r < 0.7:
            codec = rng.choice(["utf-16", "utf-16-be", "utf-32", "cp1252"])
            content = ("# r\u00e9sum\u00e9 of the figures\n" + text).encode(codec)
            out.append(Case("encoding", name, content, "not UTF-8", 1, ""))
        else:
            at = rng.randrange(len(text) + 1)
            out.append(Case("encoding", name, (text[:at] + rng.choice(CONTROL) + text[at:]).encode(),
                            "is not allowed in YAML", text.count("\n", 0, at) + 1, ""))
        # aliases: recursive, too many, expanding too far, undefined
        out.append(alias_case(name, lines, keyed, block_parents, rng))
        # truncations, anywhere before the last required key is complete
        raw = text.encode()
        cut = rng.randrange(last_required + 1)
        out.append(Case("truncation", name, raw[:cut], ""))
    return out


def alias_case(name: str, lines: list[str], keyed: dict, block_parents: list[int], rng: random.Random) -> Case:
    kind = rng.choice(["recursive", "many", "expanding", "undefined"])
    text = "".join(lines)
    if kind == "recursive":
        i = rng.choice(block_parents)
        child = lines[i + 1]
        indent = len(child) - len(child.lstrip(" "))
        if child.lstrip(" ").startswith("- "):
            loop = " " * indent + "- *loop\n"
        else:
            loop = " " * indent + "again: *loop\n"
        changed = "".join(lines[:i]) + lines[i].rstrip("\n") + " &loop\n" + loop + "".join(lines[i + 1:])
        return Case("alias", name, changed.encode(), "recursive aliases", i + 2, None)
    if kind == "many":
        width, depth = rng.randrange(3, 10), 0
        while width * depth <= yamlfile.MAX_ALIASES:
            depth += 1
        bomb = "lol:\n  l0: &l0 lol\n" + "".join(
            f"  l{d}: &l{d} [" + ", ".join([f"*l{d - 1}"] * width) + "]\n" for d in range(1, depth + 1))
        # the reader stops at the first level that passes either bound: the alias count, or the values it expands to
        count, size, depth = 0, 1, 1
        while True:
            count, size = count + width, 1 + width * size
            if count > yamlfile.MAX_ALIASES or size > yamlfile.MAX_NODES:
                break
            depth += 1
        return Case("alias", name, (text + bomb).encode(), "aliases", len(text.splitlines()) + 2 + depth, None)
    if kind == "expanding":
        bomb = ("lol:\n  a: &a [" + ", ".join(["x"] * 30) + "]\n  b: &b [" + ", ".join(["*a"] * 10) + "]\n"
                "  c: &c [" + ", ".join(["*b"] * 10) + "]\n  d: [" + ", ".join(["*c"] * 10) + "]\n")
        return Case("alias", name, (text + bomb).encode(), f"more than {yamlfile.MAX_NODES:,} values",
                    len(text.splitlines()) + 5, "lol.d")
    i = rng.choice([n - 1 for n in keyed if KEY_LINE.match(lines[n - 1].rstrip("\n"))
                    and KEY_LINE.match(lines[n - 1].rstrip("\n")).group(4)])
    m = KEY_LINE.match(lines[i].rstrip("\n"))
    changed = "".join(lines[:i]) + f"{m.group(1)}{m.group(2)}: *nowhere\n" + "".join(lines[i + 1:])
    return Case("alias", name, changed.encode(), "undefined alias", i + 1, None)


def all_cases() -> list[Case]:
    rng = random.Random(25_5)
    cases = []
    for name in sorted(SHIPPED):
        cases += data_cases(name, rng) + text_cases(name, rng)
    return cases


def test_every_broken_descriptor_is_rejected_naming_file_line_and_key_through_every_path(tmp_path, capsys):
    cases = all_cases()
    kinds = {c.kind for c in cases}
    assert len(cases) >= 1000 and len(kinds) == 12, (len(cases), sorted(kinds))
    failures = []
    for n, c in enumerate(cases):
        path = tmp_path / f"case{n}.yaml"
        path.write_bytes(c.content)
        try:
            errors = descriptor_errors(path)
        except AssertionError as e:
            failures.append(f"{c.kind} from {c.base}: {e}")
            continue
        for entry, e in errors.items():
            problems = []
            if e.file != str(path) or not str(e).startswith(f"{path}:"):
                problems.append("does not name the file")
            if not isinstance(e.line, int) or e.line < 1:
                problems.append("names no line")
            elif c.line is not None and e.line != c.line:
                problems.append(f"line {e.line}, expected {c.line}")
            if c.key is not None and e.key != c.key:
                problems.append(f"key {e.key!r}, expected {c.key!r}")
            if c.words not in e.message:
                problems.append(f"message lacks {c.words!r}")
            if problems:
                failures.append(f"{c.kind} from {c.base} through {entry}: {'; '.join(problems)}: {e}")
        if n % 25 == 0:  # the command line, for a sample: the error printed, exit code 1, no traceback
            code, out = descriptor_check(path, capsys)
            if code != 1 or f"error {path}:" not in out or "Traceback" in out:
                failures.append(f"{c.kind} from {c.base} through dioe descriptor check: exit {code}: {out}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:30])
