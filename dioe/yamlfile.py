"""Reading a descriptor or pool file: one YAML document, read safely, with the line of every key.

Descriptors and pool files come from users and from other people's repositories, so the reader trusts nothing:
the file must be UTF-8 and of descriptor size, the YAML must parse as one document, explicit tags (`!!python/...`,
`!custom`, even `!!str`) are refused rather than interpreted, aliases are few, never recursive, and cannot expand
the document past a bound (a "billion laughs" file is a few hundred bytes), and every mapping key is a plain
string given once. Each refusal is a `DescriptorError` naming the file, the line and, where there is one, the key.

    >>> data, where = parse("kind: cpu\\nmemory: {capacity_gb: 4}\\n", "x.yaml")
    >>> data["memory"], where.line(("memory", "capacity_gb"))
    ({'capacity_gb': 4}, 2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import DescriptorError
from .schema import LineMap, Path_, dotted

MAX_BYTES = 1 << 20    # the shipped descriptors are 1-2 KB; a file a thousand times that is not a descriptor
MAX_ALIASES = 32       # enough to share a few values; a bomb needs many nested ones
MAX_NODES = 20_000     # nodes with every alias expanded; the shipped descriptors have about a hundred

_KEY = object()        # marks "composing a mapping key" on the path stack


def read(path: str | Path) -> tuple[Any, LineMap]:
    """The Python data of the YAML file at `path` and where each of its keys sits."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DescriptorError(file, None, "", f"cannot read the file: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise DescriptorError(file, None, "", f"the file is {len(raw):,} bytes; expected a descriptor or pool "
                              f"file under {MAX_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DescriptorError(file, line, "", f"not UTF-8: byte 0x{raw[e.start]:02x} at column {column} "
                              f"(offset {e.start}) cannot be decoded; expected a UTF-8 text file") from None
    return parse(text, file)


def parse(text: str, file: str = "<string>") -> tuple[Any, LineMap]:
    """The Python data of YAML `text` and where each of its keys sits. `file` names it in errors."""
    lines: dict[Path_, int] = {}
    try:
        loader = _Loader(text, file)  # the reader refuses control characters here, before any parsing
        try:
            root = loader.get_single_node()
            if root is None:
                return None, LineMap(file, lines)
            _walk(root, (), lines, loader)
            data = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise _yaml_error(e, text, file) from None
    return data, LineMap(file, lines)


# libyaml scans and parses about six times faster; composing stays in Python, where compose_node sees each event
try:
    from yaml._yaml import CParser as _CParser
    _EVENTS: tuple = (_CParser,)
except ImportError:
    _CParser = None
    _EVENTS = (yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser)


class _Loader(yaml.composer.Composer, *_EVENTS, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """yaml.SafeLoader's parts, refusing explicit tags and bounding aliases while it composes, where each
    event's line and key path are still known."""

    def __init__(self, text: str, file: str):
        if _CParser is not None:
            _CParser.__init__(self, text)
        else:
            yaml.reader.Reader.__init__(self, text)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self.file = file
        self.path: list = []      # key path of the node being composed, with _KEY while composing a key
        self.open: set = set()    # anchors of collections still being composed: an alias to one is recursive
        self.aliases = 0
        self.sizes: dict[int, int] = {}  # id(node) -> its node count with aliases expanded

    def error(self, event: yaml.Event, message: str) -> DescriptorError:
        path = tuple(p for p in self.path if p is not _KEY)
        return DescriptorError(self.file, event.start_mark.line + 1, dotted(path), message)

    def compose_node(self, parent, index):
        if parent is not None:
            self.path.append(_step(index))
        try:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise self.error(event, f"more than {MAX_ALIASES} aliases; expected a descriptor that "
                                     "writes its values out")
                if event.anchor in self.open:
                    raise self.error(event, f"alias *{event.anchor} refers to a value that contains it; "
                                     "expected no recursive aliases")
            elif getattr(event, "tag", None) is not None:
                raise self.error(event, f"explicit YAML tag {event.tag!r}; expected plain values without tags")
            node = super().compose_node(parent, index)
            if id(node) not in self.sizes:  # an alias returns a node already counted
                self.sizes[id(node)] = 1 + sum(self.sizes[id(n)] for n in _children(node))
            if self.sizes[id(node)] > MAX_NODES:
                raise self.error(event, f"the document holds more than {MAX_NODES:,} values, aliases expanded; "
                                 "expected a descriptor-sized document")
            return node
        finally:
            if parent is not None:
                self.path.pop()

    def compose_sequence_node(self, anchor):
        return self._compose_open(anchor, super().compose_sequence_node)

    def compose_mapping_node(self, anchor):
        return self._compose_open(anchor, super().compose_mapping_node)

    def _compose_open(self, anchor, compose):
        if anchor is not None:
            self.open.add(anchor)
        try:
            return compose(anchor)
        finally:
            self.open.discard(anchor)


def _step(index: Any) -> Any:
    """The key-path step of a node composed under `index`: PyYAML passes a sequence position, the key node of a
    mapping value, or None while it composes a key."""
    if index is None:
        return _KEY
    if isinstance(index, int):
        return index
    return index.value if isinstance(index, yaml.ScalarNode) else "?"


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _walk(node: yaml.Node, path: Path_, lines: dict, loader: _Loader) -> None:
    """Record the line of every key; refuse keys that are not plain strings, keys given twice, and scalars that
    YAML types but Python cannot build (a date like 2024-13-45, an integer of 5,000 digits)."""
    file = loader.file
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        try:
            loader.construct_object(node)  # cached: construct_document reuses it
        except (ValueError, OverflowError) as e:
            kind = node.tag.rsplit(":", 1)[-1]
            shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
            raise DescriptorError(file, node.start_mark.line + 1, dotted(path), f"{shown!r} cannot be read "
                                  f"as YAML {kind} ({e}); expected a valid {kind}, or quotes to make it a string") \
                from None
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str"):
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else f"a {key_node.id}"
                raise DescriptorError(file, line, dotted(path), f"key {shown!r} is not a plain string "
                                      "(YAML reads yes/no/on/off/null/<< and numbers as other types); "
                                      "expected a string key, quoted if need be")
            key = key_node.value
            if key in seen:
                raise DescriptorError(file, line, dotted(path + (key,)),
                                      f"duplicate key; expected each key once (first given on line {seen[key]})")
            seen[key] = line
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, loader)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, loader)


def _yaml_error(e: yaml.YAMLError, text: str, file: str) -> DescriptorError:
    """A YAML syntax error (or a truncated file) as a DescriptorError at its line."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        line = mark.line + 1
    elif isinstance(e, yaml.reader.ReaderError):  # a control character the YAML reader refuses
        before = text.encode()[:e.position] if _CParser is not None else text[:e.position]  # libyaml counts bytes
        line = before.count("\n" if isinstance(before, str) else b"\n") + 1
    else:
        line = None
    if isinstance(e, yaml.MarkedYAMLError):
        what = str(e.problem or e.context)
        if mark is not None:
            what += f" at column {mark.column + 1}"
        if e.problem and e.context:
            what += f", {e.context}" + (f" on line {e.context_mark.line + 1}" if e.context_mark else "")
    elif isinstance(e, yaml.reader.ReaderError):
        code = e.character if isinstance(e.character, int) else ord(e.character)
        what = f"control character U+{code:04X} is not allowed in YAML"
    else:
        what = str(e)
    return DescriptorError(file, line, "", f"not valid YAML: {what}")


__all__ = ["MAX_ALIASES", "MAX_BYTES", "MAX_NODES", "parse", "read"]
