"""Making user-provided text safe to show: in a terminal, in Markdown, in one line.

Names, errors and labels come from sweep files, scenario modules, exceptions
and node labels: any of them may hold control characters (ESC sequences, NUL)
or Markdown/HTML markup. These functions are the one place that decides how
such text is shown; renderers and the CLI call them, never ``str`` alone.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls but tab and newline, DEL, C1 controls, and lone surrogates.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# What could turn text into markup: HTML tags and entities (raw HTML passes through Markdown
# renderers; a tag cannot start without "<"), table cells, code spans and links. Emphasis
# characters and ">" mid-line are left alone: cosmetic, not injection.
_MARKDOWN = str.maketrans({"\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]",
                           "<": "&lt;", "&": "&amp;"})


# Characters XML 1.0 cannot carry at all, even escaped (controls, lone surrogates, U+FFFE/U+FFFF).
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_chars(value: Any) -> str:
    """``value`` as text XML 1.0 can carry: every character it forbids becomes U+FFFD (markup is not escaped)."""
    return _XML_INVALID.sub("\ufffd", str(value))


def visible(value: Any) -> str:
    """``value`` as text whose control characters are shown as escapes (``\\x1b``), never sent raw."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        str(value))


def one_line(value: Any, limit: int | None = None) -> str:
    """:func:`visible`, with line breaks and tabs folded to spaces (and cut at ``limit`` characters)."""
    text = " ".join(visible(value).split())
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def markdown(value: Any) -> str:
    """Inline Markdown text that renders exactly as ``value``: one line, markup and HTML escaped."""
    return one_line(value).translate(_MARKDOWN)


def code(value: Any) -> str:
    """``value`` as an inline Markdown code span (outside tables): one line, whatever backticks it holds."""
    text = one_line(value)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
