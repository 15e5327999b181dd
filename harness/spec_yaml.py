"""Reading a sweep file: YAML that cannot hurt the process reading it.

PyYAML's ``safe_load`` builds only plain Python objects, but on its own it
still lets a file

- repeat a key, silently keeping the last value (a copy-pasted environment
  replaces the one above it; a second ``formats:`` wins over the first);
- nest thousands of levels deep (a ``RecursionError`` traceback);
- expand a few hundred bytes of aliases into billions of nodes ("billion
  laughs": harmless as shared objects, fatal for whatever walks them later);
- be any size, or not be text at all.

``read_document`` refuses each of these with a ``YamlProblem`` naming the
line (and the dotted field, where there is one) before anything else looks
at the document. No TensorFlow or Ray here.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

#: A sweep is a few KB; refuse anything larger than this before parsing it.
MAX_BYTES = 10 * 1024 * 1024
#: Nesting a sweep never exceeds (it needs about 5 levels).
MAX_DEPTH = 50
#: Nodes the document may hold once every alias is expanded (a large sweep has a few thousand).
MAX_NODES = 100_000


class YamlProblem(ValueError):
    """The file cannot be read as a sweep document: ``field`` (dotted, or "") and a one-line message."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}" if field else message)


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that counts nesting depth and alias-expanded nodes while composing."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._open: set[str] = set()  # anchors of the collections being composed
        self._shape: dict[int, tuple[int, int] | None] = {}  # id(node) -> (expanded size, depth); None: in progress

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        """(nodes, depth) of ``node`` with its aliases expanded; aliases are shared node objects."""
        key = id(node)
        if key in self._shape:
            shape = self._shape[key]
            if shape is None:
                raise YamlProblem("", f"{_at(node.start_mark)}: an alias refers to the collection that contains it "
                                      "(a recursive structure); a sweep never needs one")
            return shape
        self._shape[key] = None
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        size, depth = 1, 1
        for child in children:
            s, d = self._measure(child)
            size, depth = size + s, max(depth, d + 1)
        self._shape[key] = (size, depth)
        return size, depth

    def _count(self, nodes: int, depth: int, mark: Any) -> None:
        if self._depth + depth > MAX_DEPTH:
            raise YamlProblem("", f"{_at(mark)}: nested deeper than {MAX_DEPTH} levels; a sweep needs about 5 "
                                  "(is a bracket or indentation runaway?)")
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise YamlProblem("", f"{_at(mark)}: the document expands to more than {MAX_NODES} values "
                                  "(aliases such as *name repeat what they refer to); a sweep needs far fewer: "
                                  "write the values out, or use fewer aliases")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self._open:
                raise YamlProblem("", f"{_at(event.start_mark)}: *{event.anchor} refers to the collection that "
                                      "contains it (a recursive structure); a sweep never needs one")
            node = self.anchors.get(event.anchor)
            if node is not None:  # an unknown anchor: PyYAML's own error follows
                self._count(*self._measure(node), event.start_mark)
            return super().compose_node(parent, index)
        event = self.peek_event()
        self._count(1, 1, event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # beyond Python's int-to-str limit (4300 digits)
        raise YamlProblem("", f"invalid YAML at {_at(node.start_mark)}: an integer of {len(node.value)} characters; "
                              "no sweep field takes numbers that large") from None


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _key_identity(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """What makes two keys the same key: their constructed value (``1`` and ``01`` are one key)."""
    if not isinstance(node, yaml.ScalarNode):
        return ("node", id(node))
    try:
        value = loader.construct_object(node, deep=True)
        hash(value)
        return value
    except Exception:  # an unconstructible key: PyYAML reports it when the document is built
        return (node.tag, node.value)


def _check_duplicate_keys(loader: yaml.SafeLoader, root: yaml.Node) -> None:
    """Refuse a key that appears twice in one mapping (YAML would keep the last one silently).

    Keys merged in with ``<<: *anchor`` may be overridden, as YAML intends.
    """
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*path, str(i))) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    stack.append((value, path))
                    continue
                ident = _key_identity(loader, key)
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                if ident in first:
                    raise YamlProblem(".".join((*path, name)),
                                      f"key {name!r} appears twice (line {first[ident].start_mark.line + 1} and "
                                      f"line {key.start_mark.line + 1}); YAML would silently keep only the last: "
                                      "remove or rename one")
                first[ident] = key
                stack.append((value, (*path, name)))


def parse_text(text: str) -> Any:
    """The document in ``text``, or ``YamlProblem`` (bad syntax, a repeated key, runaway nesting or aliases)."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses NUL and other control characters right here
        root = loader.get_single_node()
        if root is None:
            return None
        _check_duplicate_keys(loader, root)
        return loader.construct_document(root)
    except YamlProblem:
        raise
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # ValueError: e.g. an int over 4300 digits
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        if isinstance(exc, yaml.reader.ReaderError):  # a control character: the reader knows its offset only
            before = text[:exc.position]
            where = f"line {before.count(chr(10)) + 1}, column {len(before.rsplit(chr(10), 1)[-1]) + 1}: "
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        context = getattr(exc, "context", None)
        if context and problem.startswith("but "):  # "expected a single document in the stream but found another"
            problem = f"{context} {problem}"
        if "'\\t'" in problem:
            problem += " (indent with spaces: YAML does not allow tabs there)"
        raise YamlProblem("", f"invalid YAML at {where}{problem}" if where else f"invalid YAML: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_document(path: str | os.PathLike) -> Any:
    """Read and parse a sweep file with every bound above.

    Raises:
        YamlProblem: unreadable, too large, not UTF-8, empty, or not safe YAML.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # bounded even for a FIFO or /dev/zero
    except OSError as exc:
        raise YamlProblem("", f"cannot read sweep file: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise YamlProblem("", f"file is larger than {MAX_BYTES // (1024 * 1024)} MB; a sweep file is a few KB "
                              "(is this the right file?)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise YamlProblem("", f"not a UTF-8 text file (byte {exc.start}, line {line}: {raw[exc.start:exc.start + 1]!r}); "
                              "save it as UTF-8") from None
    data = parse_text(text)
    if data is None:
        raise YamlProblem("", "the file is empty (or only comments); a sweep file is a YAML mapping with at least "
                              "'scenarios' and 'environments'")
    return data
