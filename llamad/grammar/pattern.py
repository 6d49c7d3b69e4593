"""A JSON Schema `pattern` as GBNF over the JSON text of a string, or None when the grammar
cannot enforce it (the keyword is then loosened, see llamad.grammar.schema).

llama-cpp-python's own converter copies the regex almost verbatim into the grammar: `.`
and `[^x]` then allow a raw `"` or newline (broken JSON), `\\d` is not GBNF, and an
unanchored pattern is an error. Here the regex is parsed by Python's own parser and each
piece becomes what it matches, written the way JSON spells it (`"` as `\\"`, a newline as
`\\n`). Patterns search (JSON Schema's semantics): an unanchored start or end is padded with
any string characters.

Every translation is exact or narrower than the regex in both dialects a client may mean
(ECMA-262 and Python's `re`, which `jsonschema` uses): `\\d`, `\\w` and `\\s` match their
ASCII members; `.` excludes every line terminator either dialect knows. What cannot be
written that way (look-arounds, back-references, inline flags, `\\b`, anchors inside the
pattern, counts above MAX_COUNT, a regex Python cannot parse) gives None.
"""

from __future__ import annotations

import json
import re

try:  # Python 3.11+
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

MAX_COUNT = 128  # larger {m,n} counts expand into grammars too big to be worth it
MAX_CODEPOINT = 0x10FFFF
_SPECIAL = {0x22, 0x5C} | set(range(0x20))  # characters JSON must escape inside a string
# The escaped characters a charset may produce; other control characters are left out (a
# narrower set, still exact for what is written, and nothing a model should emit).
_WRITTEN_ESCAPED = (0x09, 0x0A, 0x0D, 0x22, 0x5C)
# Any one character of a JSON string, spelled as JSON allows.
JSON_CHAR = r'([^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}))'
_ANY_TEXT = JSON_CHAR + "*"

_ASCII = [(0, 0x7F)]
_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE_BOTH = [(0x09, 0x0D), (0x20, 0x20)]  # whitespace in ECMA and in Python
_SPACE_EITHER = [(0x09, 0x0D), (0x1C, 0x20)]  # Python also counts \x1c-\x1f
_LINE_ENDS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]


class _Unsupported(Exception):
    pass


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal (matches exactly these characters)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def pattern_gbnf(pattern: str) -> str | None:
    """A GBNF expression for the JSON-escaped content of strings matching `pattern`."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None
    if parsed.state.flags & ~(sre.SRE_FLAG_UNICODE):
        return None  # (?i), (?s), (?m), (?x): the grammar has no flags
    try:
        return _sequence(list(parsed), lead=True, trail=True)
    except (_Unsupported, RecursionError):
        return None


def _is_start(item) -> bool:
    return item[0] is sre.AT and item[1] in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)


def _is_end(item) -> bool:
    return item[0] is sre.AT and item[1] in (sre.AT_END, sre.AT_END_STRING)


def _sequence(items: list, lead: bool, trail: bool) -> str:
    """`lead`/`trail`: this sequence begins/ends the whole regex, so unless it is anchored
    there it matches anywhere, padded with any text."""
    head: list[str] = []
    tail: list[str] = []
    lead_branch = trail_branch = False
    if lead:
        if items and _is_start(items[0]):
            items = items[1:]
        elif items and items[0][0] is sre.BRANCH:
            lead_branch = True  # each alternative handles its own anchor
        else:
            head = [_ANY_TEXT]
    if trail:
        if items and _is_end(items[-1]):
            items = items[:-1]
        elif items and items[-1][0] is sre.BRANCH:
            trail_branch = True
        else:
            tail = [_ANY_TEXT]
    parts = [
        _item(op, av, lead=lead_branch and i == 0, trail=trail_branch and i == len(items) - 1)
        for i, (op, av) in enumerate(items)
    ]
    body = [p for p in head + parts + tail if p]
    return "(" + " ".join(body) + ")" if body else '""'


def _item(op, av, lead: bool = False, trail: bool = False) -> str:
    if op is sre.LITERAL:
        return gbnf_literal(_json_char(av))
    if op is sre.NOT_LITERAL:
        return _charset(_complement([(av, av)]))
    if op is sre.ANY:
        return _charset(_complement(_LINE_ENDS))
    if op is sre.IN:
        return _charset(_class(av))
    if op is sre.BRANCH:
        return "(" + " | ".join(_sequence(list(alt), lead, trail) for alt in av[1]) + ")"
    if op is sre.SUBPATTERN:
        _group, add_flags, del_flags, inner = av
        if add_flags or del_flags:
            raise _Unsupported("inline flags")
        return _sequence(list(inner), lead=False, trail=False)
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # lazy or greedy: the same strings match
        low, high, inner = av
        high = None if high == sre.MAXREPEAT else high
        if low > MAX_COUNT or (high is not None and high > MAX_COUNT):
            raise _Unsupported("count too large")
        return repeat(_sequence(list(inner), lead=False, trail=False), low, high)
    raise _Unsupported(str(op))  # AT elsewhere, ASSERT, GROUPREF, ATOMIC_GROUP, POSSESSIVE_REPEAT


def repeat(inner: str, low: int, high: int | None) -> str:
    """`inner` repeated low..high times (high None: no limit), in GBNF."""
    if high == 0:
        return '""'
    if (low, high) == (0, None):
        return f"{inner}*"
    if (low, high) == (1, None):
        return f"{inner}+"
    if (low, high) == (0, 1):
        return f"{inner}?"
    if high is None:
        return f"{inner}{{{low},}}"
    if low == high:
        return f"{inner}{{{low}}}"
    return f"{inner}{{{low},{high}}}"


def _json_char(code: int) -> str:
    """How JSON writes this one character inside a string."""
    return json.dumps(chr(code), ensure_ascii=False)[1:-1]


def _class(items) -> list[tuple[int, int]]:
    """The code point ranges a `[...]` (or `\\d`-like) item matches, never more than it does."""
    negate = any(op is sre.NEGATE for op, _ in items)
    ranges: list[tuple[int, int]] = []
    for op, av in items:
        if op is sre.NEGATE:
            continue
        if op is sre.LITERAL:
            ranges.append((av, av))
        elif op is sre.RANGE:
            ranges.append(av)
        elif op is sre.CATEGORY:
            ranges += _category(av, negated_class=negate)
        else:
            raise _Unsupported(str(op))
    if not negate:
        return _merged(ranges)
    if any(op is sre.CATEGORY for op, _ in items):
        return _complement(ranges, within=_ASCII)  # categories are only exact on ASCII
    return _complement(ranges)


def _category(category, negated_class: bool) -> list[tuple[int, int]]:
    """Inside `[^...]` the set must be a superset (its complement is written), elsewhere a subset."""
    if category is sre.CATEGORY_DIGIT:
        return _DIGIT
    if category is sre.CATEGORY_WORD:
        return _WORD
    if category is sre.CATEGORY_SPACE:
        return _SPACE_EITHER if negated_class else _SPACE_BOTH
    if negated_class:
        raise _Unsupported("negated category in a negated class")
    if category is sre.CATEGORY_NOT_DIGIT:
        return _complement(_DIGIT, within=_ASCII)
    if category is sre.CATEGORY_NOT_WORD:
        return _complement(_WORD, within=_ASCII)
    if category is sre.CATEGORY_NOT_SPACE:
        return _complement(_SPACE_EITHER, within=_ASCII)
    raise _Unsupported(str(category))


def _merged(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _complement(ranges, within=((0, MAX_CODEPOINT),)) -> list[tuple[int, int]]:
    out = []
    for start, end in within:
        position = start
        for low, high in _merged(ranges):
            if high < position or low > end:
                continue
            if low > position:
                out.append((position, low - 1))
            position = max(position, high + 1)
        if position <= end:
            out.append((position, end))
    return out


def _class_char(code: int) -> str:
    if 0x30 <= code <= 0x39 or 0x41 <= code <= 0x5A or 0x61 <= code <= 0x7A:
        return chr(code)
    if code < 0x100:
        return f"\\x{code:02X}"
    if code < 0x10000:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def _charset(ranges: list[tuple[int, int]]) -> str:
    """One character from `ranges`, JSON-escaped where JSON needs it."""
    plain = _complement(list((c, c) for c in _SPECIAL), within=ranges) if ranges else []
    alternatives = []
    if plain:
        body = "".join(_class_char(a) + ("-" + _class_char(b) if b > a else "") for a, b in plain)
        alternatives.append(f"[{body}]")
    for code in _WRITTEN_ESCAPED:
        if any(low <= code <= high for low, high in ranges):
            alternatives.append(gbnf_literal(_json_char(code)))
    if not alternatives:
        raise _Unsupported("a class that matches nothing")
    return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"
