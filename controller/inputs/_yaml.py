"""YAML documents that remember where each field was written.

A spec error should point at a line (``small.yaml:14: spec.nodeGroups[0].gpusPerNode: ...``),
so spec files are parsed once into both plain data and PyYAML's node tree, and
``line_of(tree, "spec.nodeGroups[0].gpusPerNode")`` walks the tree to the field (or to the
closest enclosing field that exists, for a field that is missing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from aifactory.controller.core.errors import InputFileError

__all__ = ["YamlDocument", "line_of", "parse_yaml"]

_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """The data of one YAML document and its node tree (None for an empty file)."""

    data: Any
    tree: yaml.Node | None


def parse_yaml(text: str, path: str) -> YamlDocument:
    """Parse exactly one document; syntax errors name the file, line and column."""
    loader = yaml.SafeLoader(text)
    try:
        tree = loader.get_single_node()
        data = loader.construct_document(tree) if tree is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        col = f" (column {mark.column + 1})" if mark is not None else ""
        raise InputFileError(path, f"invalid YAML: {exc.problem or exc.context}{col}",
                             line) from exc
    except yaml.YAMLError as exc:
        raise InputFileError(path, f"invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    return YamlDocument(data, tree)


def line_of(tree: yaml.Node | None, field: str) -> int | None:
    """1-based line of ``field`` (``a.b[2].c``) in ``tree``, or of its deepest existing parent."""
    if tree is None:
        return None
    node: yaml.Node = tree
    line: int = node.start_mark.line + 1
    for name, index in _TOKEN.findall(field):
        child: yaml.Node | None = None
        if name and isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == name:
                    child = value
                    break
        elif index and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
            child = node.value[int(index)]
        if child is None:
            return line
        node = child
        line = node.start_mark.line + 1
    return line
