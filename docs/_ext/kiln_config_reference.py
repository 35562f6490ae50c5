"""Sphinx directive ``kiln-config-reference``: the configuration reference, read from conf/*.yaml.

Every YAML file matched by the directive's argument (default ``conf/*.yaml``, relative to the repo
root) becomes a section: the file's leading comment is its description, and a table lists every key
(nested keys dotted, as on the Hydra command line), its default as written in the file, and its
comment. A key's comment is the one at the end of its line, or the comment block right above it; a
comment block above a key that has its own line comment labels the group of keys that follows
(``# kiln additions``). Text in backticks renders as code. The YAML files are build dependencies, so
the reference is rebuilt whenever they change and can never drift from conf/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from docutils import nodes
from sphinx.util.docutils import SphinxDirective


@dataclass
class ConfigKey:
    key: str
    default: str
    comment: str = ""
    group: str = ""  # a label shown above this key, starting a group of keys
    multiline: bool = False


@dataclass
class ConfigFile:
    description: list[str] = field(default_factory=list)  # paragraphs
    keys: list[ConfigKey] = field(default_factory=list)


_COMMENT = re.compile(r"(?:^|\s)#\s?(.*)$")


def _line_comment(rest: str) -> str:
    """The comment in what follows a key or value on its line ('' if none)."""
    match = _COMMENT.search(rest)
    return match.group(1).strip() if match else ""


def _comment_block_above(lines: list[str], line: int) -> list[str]:
    """The comment-only lines directly above `line` (no blank line between), top to bottom."""
    block = []
    index = line - 1
    while index >= 0 and lines[index].strip().startswith("#"):
        block.append(lines[index].strip()[1:].strip())
        index -= 1
    return block[::-1]


def _paragraphs(comment_lines: list[str]) -> list[str]:
    """Comment lines joined into paragraphs; an empty comment line separates paragraphs."""
    paragraphs, current = [], []
    for text in [*comment_lines, ""]:
        if text:
            current.append(text)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def _value_source(text: str, lines: list[str], value: yaml.Node) -> tuple[str, bool]:
    """The value as written in the file, without comments; True when it spans several lines."""
    start, end = value.start_mark, value.end_mark
    if start.index == end.index:
        return "null", False
    if start.line == end.line:
        return text[start.index : end.index].strip(), False
    last = end.line if end.column > 0 else end.line - 1
    block = [lines[start.line][start.column :]] + [line[start.column :] for line in lines[start.line + 1 : last + 1]]
    return "\n".join(line.rstrip() for line in block).strip(), True


def read_config(path: Path) -> ConfigFile:
    """Parse one YAML file into its description and documented keys (in file order)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    config = ConfigFile()
    if not isinstance(root, yaml.MappingNode) or not root.value:
        config.description = _paragraphs([line.strip().lstrip("#").strip() for line in lines if line.strip()])
        return config
    first_key_line = root.value[0][0].start_mark.line
    header = lines[:first_key_line]
    config.description = _paragraphs(
        [line.strip()[1:].strip() if line.strip().startswith("#") else "" for line in header]
    )

    def walk(mapping: yaml.MappingNode, prefix: str) -> None:
        for key_node, value_node in mapping.value:
            key = f"{prefix}{key_node.value}"
            key_line = key_node.start_mark.line
            nested = isinstance(value_node, yaml.MappingNode) and value_node.value
            if nested or value_node.start_mark.line != key_line:
                inline = _line_comment(lines[key_line][key_node.end_mark.column :].split(":", 1)[-1])
            else:
                inline = _line_comment(lines[key_line][value_node.end_mark.column :])
            above = [] if key_line == first_key_line else _comment_block_above(lines, key_line)
            group = " ".join(above) if above and inline else ""
            comment = inline or " ".join(_paragraphs(above))
            if nested:
                if comment or group:
                    config.keys.append(ConfigKey(key, "", comment, group))
                walk(value_node, f"{key}.")
            else:
                default, multiline = _value_source(text, lines, value_node)
                config.keys.append(ConfigKey(key, default, comment, group, multiline))

    walk(root, "")
    return config


def _inline_text(text: str) -> list[nodes.Node]:
    """Plain text with `backticked` parts as inline code."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: keep the text as it is
        return [nodes.Text(text)]
    return [nodes.literal(part, part) if odd else nodes.Text(part) for odd, part in enumerate(parts) if part or odd]


def _entry(*children: nodes.Node) -> nodes.entry:
    entry = nodes.entry()
    entry += children
    return entry


def _keys_table(keys: list[ConfigKey]) -> nodes.table:
    table = nodes.table(classes=["kiln-config"])
    group = nodes.tgroup(cols=3)
    table += group
    for width in (30, 25, 45):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    head += nodes.row("", *(_entry(nodes.paragraph(text=title)) for title in ("Key", "Default", "Description")))
    body = nodes.tbody()
    group += body
    for key in keys:
        if key.group:
            label = nodes.entry(morecols=2)
            label += nodes.paragraph("", "", nodes.strong("", "", *_inline_text(key.group)))
            body += nodes.row("", label)
        if key.multiline:
            default = nodes.literal_block(key.default, key.default, language="yaml")
        else:
            default = (
                nodes.paragraph("", "", nodes.literal(key.default, key.default)) if key.default else nodes.paragraph()
            )
        body += nodes.row(
            "",
            _entry(nodes.paragraph("", "", nodes.literal(key.key, key.key))),
            _entry(default),
            _entry(nodes.paragraph("", "", *_inline_text(key.comment))),
        )
    return table


class ConfigReference(SphinxDirective):
    """One section per matched YAML file: its description and a table of its keys."""

    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        root = Path(self.env.srcdir).resolve().parent  # docs/ sits in the repo root
        pattern = self.arguments[0] if self.arguments else "conf/*.yaml"
        paths = sorted(root.glob(pattern))
        if not paths:
            raise self.error(f"kiln-config-reference: no file matches {pattern!r} under {root}")
        sections = []
        for path in paths:
            self.env.note_dependency(str(path))
            config = read_config(path)
            title = path.relative_to(root).as_posix()
            # The file's path is its label: {ref}`conf/train_model.yaml` links to its section.
            section = nodes.section(ids=[nodes.make_id(title)], names=[nodes.fully_normalize_name(title)])
            section += nodes.title(title, "", nodes.literal(title, title))
            for paragraph in config.description:
                section += nodes.paragraph("", "", *_inline_text(paragraph))
            if config.keys:
                section += _keys_table(config.keys)
            self.state.document.note_explicit_target(section, section)
            sections.append(section)
        return sections


def setup(app):
    app.add_directive("kiln-config-reference", ConfigReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
