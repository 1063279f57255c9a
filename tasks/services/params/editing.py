"""params.yaml edited in place: its comments, key order and layout kept (a ruamel.yaml round trip).

ddae writes params.yaml for ``ddae run --set``, a deployment's ``overrides`` and ``ddae profile``. An
edit is planned on the text, checked to read back (as the stages and DVC read it) as exactly the
intended values, validated by the caller, and only then written atomically: a refused edit leaves the
file byte-identical.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.error import YAMLError as RuamelYAMLError
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.tokens import CommentToken

from ddae_core.atomic import write_bytes_atomic
from ddae_core.config import ConfigError
from tasks.services.params.loading import parse_params

T = TypeVar("T")
_STR = "tag:yaml.org,2002:str"


@dataclass(frozen=True)
class Setting:
    """One leaf of params.yaml to set, e.g. ``Setting("pretrain.train.lr", 0.0004)``.

    ``comment`` (``"# ..."``), when given, replaces the key's end-of-line comment; it is placed at
    ``column`` unless the key already had a comment (whose column is kept).
    """

    key: str
    value: Any
    comment: str | None = None
    column: int = 29  # where params.yaml's comments start


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``a.b.c`` (plain dicts); missing sections are created."""
    *parents, last = dotted.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[:i + 1])}: is a value, not a section (setting {dotted!r})")
        node = child
    node[last] = value


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested mapping by its dotted key (``pretrain.train.lr``), in file order."""
    leaves: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            leaves.update(flatten(value, dotted))
        else:
            leaves[dotted] = value
    return leaves


def edit_params(path: Path, settings: Iterable[Setting], validate: Callable[[dict], T], *,
                remove: Iterable[str] = (), write: bool = True) -> T:
    """Apply ``settings`` (then drop the top-level keys ``remove``) to the params file at ``path``.

    ``validate`` gets the new values as the stages will read them and raises to refuse the edit;
    only after it returns is the file rewritten (atomically, only if its text changes, and only with
    ``write``). Returns what ``validate`` returned.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    new_text, data = planned_text(text, list(settings), tuple(remove), source=path.name)
    result = validate(data)
    if write and new_text != text:
        write_bytes_atomic(path, new_text.encode())
    return result


def planned_text(text: str, settings: list[Setting], remove: tuple[str, ...] = (),
                 source: str = "params.yaml") -> tuple[str, dict]:
    """(the edited text, its values as the stages and DVC read them).

    Raises:
        ConfigError: the text is not a params mapping, a setting needs a section where a value is, or
            the edited text would not read back as exactly the values set.
    """
    expected = parse_params(text, source)
    if not isinstance(expected, dict):
        raise ConfigError(f"{source}: expected a mapping of params sections, got {type(expected).__name__}")
    rt = _round_trip()
    try:
        doc = rt.load(text)
    except RuamelYAMLError as err:  # YAML the safe loader above took but the round trip cannot keep
        raise ConfigError(f"{source}: cannot be edited in place: {err}") from None
    if doc is None:
        doc = CommentedMap()
    for setting in settings:
        set_dotted(expected, setting.key, setting.value)
        _set_leaf(doc, setting)
    for key in remove:
        if key in expected:
            del expected[key]
            _remove_key(doc, key)
    out = io.StringIO()
    rt.dump(doc, out)
    new_text = out.getvalue()
    try:
        read_back = parse_params(new_text, source)
    except ConfigError:
        read_back = None
    if read_back != expected:
        got, want = flatten(read_back) if isinstance(read_back, dict) else {}, flatten(expected)
        wrong = sorted(k for k in set(got) | set(want) if got.get(k, KeyError) != want.get(k, KeyError))
        raise ConfigError(f"{source}: {wrong[0] if wrong else 'the file'}: the edited file would not read "
                          f"back as the value set; nothing was written")
    return new_text, read_back


def end_of_line_comments(text: str) -> dict[str, tuple[str, int]]:
    """Dotted key -> (its end-of-line comment, the comment's column) for each commented leaf of ``text``."""
    found: dict[str, tuple[str, int]] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, CommentedMap) and len(value):
                walk(value, dotted)
                continue
            comment, _ = _split(_token((node, key, 2)))
            if comment.startswith("#"):
                found[dotted] = (comment.rstrip(), _token((node, key, 2)).column)

    doc = _round_trip().load(text)
    if isinstance(doc, CommentedMap):
        walk(doc, "")
    return found


# ---------------------------------------------------------------------------------------------
# The ruamel.yaml side: where values, comments and the blank lines between sections live


class _Representer(RoundTripRepresenter):
    """New values written so that YAML 1.1 readers (PyYAML) read them as YAML 1.2 ones (DVC, stages) do."""

    def represent_str(self, data: str) -> Any:
        if yaml.resolver.Resolver().resolve(yaml.ScalarNode, data, (True, False)) != _STR:
            return self.represent_scalar(_STR, data, style="'")  # "no", "1e-4", "0x10" stay strings
        return super().represent_str(data)

    def represent_float(self, data: float) -> Any:
        return self.represent_scalar("tag:yaml.org,2002:float", yaml.safe_dump(data).splitlines()[0])  # 1.0e-05

    def represent_none(self, data: None) -> Any:
        return self.represent_scalar("tag:yaml.org,2002:null", "null")


_Representer.add_representer(str, _Representer.represent_str)
_Representer.add_representer(float, _Representer.represent_float)
_Representer.add_representer(type(None), _Representer.represent_none)


def _round_trip() -> YAML:
    """params.yaml's layout: 2-space mappings, ``- `` items indented under their key, long lines kept."""
    rt = YAML(typ="rt")
    rt.Representer = _Representer
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    return rt


def _styled(value: Any, old: Any) -> Any:
    """``value`` as ruamel nodes, in the old value's style: a list written ``[a, b]`` stays inline."""
    if isinstance(value, dict):
        node = CommentedMap()
        for key, item in value.items():
            node[key] = _styled(item, old.get(key) if isinstance(old, dict) else None)
        if not value:
            node.fa.set_flow_style()  # {}
        return node
    if isinstance(value, (list, tuple)):
        olds = list(old) if isinstance(old, list) else []
        seq = CommentedSeq(_styled(item, olds[i] if i < len(olds) else (olds[0] if olds else None))
                           for i, item in enumerate(value))
        if not value:
            flow = True  # [] (an empty block sequence cannot be written)
        elif isinstance(old, CommentedSeq) and old.fa.flow_style() is not None:
            flow = old.fa.flow_style()
        else:
            flow = not any(isinstance(item, (list, tuple, dict)) for item in value)
        seq.fa.set_flow_style() if flow else seq.fa.set_block_style()
        return seq
    return value


def _same(node: Any, value: Any) -> bool:
    """A loaded node equal to ``value``, type for type (``1`` is not ``1.0`` nor ``true``)."""
    if isinstance(value, dict):
        return isinstance(node, dict) and list(node) == list(value) and all(_same(node[k], v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return isinstance(node, list) and len(node) == len(value) and all(map(_same, node, value))
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return isinstance(node, base) and not (base is int and isinstance(node, bool)) and base(node) == value
    return node is None and value is None


def _set_leaf(doc: CommentedMap, setting: Setting) -> None:
    *parents, last = setting.key.split(".")
    node, grown, grown_end = doc, None, None
    for part in parents:
        child = node.get(part)
        if child is None:
            if grown is None:
                grown, grown_end = node, _end_slot(node)
            node[part] = child = CommentedMap()
        node = child  # set_dotted already refused a value where a section is needed
    if last in node:
        if not _same(node[last], setting.value):  # an equal value keeps its spelling ("" stays "")
            node[last] = _styled(setting.value, node[last])  # same place, same comment
    else:
        if grown is None:
            grown, grown_end = node, _end_slot(node)
        node[last] = _styled(setting.value, None)
    if setting.comment is not None:
        _set_eol_comment(node, last, setting.comment, setting.column)
    if grown is not None:
        _move_tail(grown_end, _end_slot(grown))


def _remove_key(doc: CommentedMap, key: str) -> None:
    end = _end_slot(doc)
    last_key = next(reversed(doc), None)
    del doc[key]
    doc.ca.items.pop(key, None)
    if key == last_key:  # the file's closing comments were attached to it
        _move_tail(end, _end_slot(doc))


# A "slot" is (comment holder, index, position) of the token printed after the last line of a node:
# ruamel keeps an end-of-line comment and every blank/comment line after it in that one token.
Slot = tuple[Any, Any, int]


def _end_slot(node: Any) -> Slot | None:
    """The slot of the last line of ``node`` (descending into its last value), or None if empty."""
    if isinstance(node, CommentedMap) and len(node):
        key = next(reversed(node))
        value = node[key]
        if isinstance(value, (CommentedMap, CommentedSeq)) and len(value) and not value.fa.flow_style():
            return _end_slot(value)
        return node, key, 2
    if isinstance(node, CommentedSeq) and len(node):
        index = len(node) - 1
        value = node[index]
        if isinstance(value, (CommentedMap, CommentedSeq)) and len(value) and not value.fa.flow_style():
            return _end_slot(value)
        return node, index, 0
    return None


def _token(slot: Slot) -> CommentToken | None:
    holder, key, position = slot
    entry = holder.ca.items.get(key)
    return entry[position] if entry and len(entry) > position else None


def _put_token(slot: Slot, token: CommentToken | None) -> None:
    holder, key, position = slot
    entry = holder.ca.items.setdefault(key, [None, None, None, None])
    entry[position] = token


def _split(token: CommentToken | None) -> tuple[str, str]:
    """A token's end-of-line comment (``"# ..."`` or ``""``) and the lines after it."""
    if token is None:
        return "", ""
    first, _, tail = token.value.partition("\n")
    return first, tail


def _continued(first: str, tail: str) -> tuple[str, str]:
    """The comment lines that go on with the end-of-line comment ``first`` (up to the first blank line),
    and the rest of ``tail``: blank lines and what follows them."""
    if not first:
        return "", tail
    lines = tail.split("\n")
    count = next((i for i, line in enumerate(lines) if not line.strip().startswith("#")), len(lines))
    return "".join(line + "\n" for line in lines[:count]), "\n".join(lines[count:])


def _move_tail(source: Slot | None, target: Slot | None) -> None:
    """Blank lines and comments that followed ``source``'s line now follow ``target``'s; the lines that
    continue ``source``'s own end-of-line comment stay with it."""
    if source is None or target is None or source[:2] == target[:2]:
        return
    token = _token(source)
    first, tail = _split(token)
    kept, tail = _continued(first, tail)
    if not tail:
        return
    token.value = first + "\n" + kept
    if not first:
        _put_token(source, None)
    target_token = _token(target)
    target_first, target_tail = _split(target_token)
    if target_token is None:
        _put_token(target, CommentToken("\n" + tail, CommentMark(0), None))
    else:
        target_token.value = target_first + "\n" + target_tail + tail


def _set_eol_comment(node: CommentedMap, key: str, comment: str, column: int) -> None:
    slot = (node, key, 2)
    old = _token(slot)
    _, tail = _split(old)
    if old is not None and old.value.startswith("#"):
        column = old.column
    _put_token(slot, CommentToken(f"{comment}\n{tail}", CommentMark(column), None))
