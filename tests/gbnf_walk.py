"""Random texts from a GBNF grammar, for property tests: a small reader of the GBNF that
llamad writes (one rule per line) and a random walk that stays short.

What it generates is only a candidate: tests hand each text to llama.cpp's own grammar
sampler, which decides whether the grammar really allows it.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "/": "/"}


@dataclass
class Lit:
    text: str


@dataclass
class Cls:
    negated: bool
    ranges: list[tuple[int, int]]


@dataclass
class Ref:
    name: str


@dataclass
class Alt:
    options: list[list]  # each option: a sequence of nodes


@dataclass
class Rep:
    item: object
    low: int
    high: int | None


class Reader:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def space(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in " \t":
            self.i += 1

    def char(self) -> str:
        c = self.text[self.i]
        if c != "\\":
            self.i += 1
            return c
        kind = self.text[self.i + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(kind)
        if width:
            self.i += 2 + width
            return chr(int(self.text[self.i - width : self.i], 16))
        self.i += 2
        return ESCAPES[kind]

    def alternatives(self) -> Alt:
        options = [self.sequence()]
        while self.i < len(self.text) and self.text[self.i] == "|":
            self.i += 1
            options.append(self.sequence())
        return Alt(options)

    def sequence(self) -> list:
        items: list = []
        while True:
            self.space()
            if self.i >= len(self.text) or self.text[self.i] in "|)":
                return items
            c = self.text[self.i]
            if c == '"':
                self.i += 1
                out = ""
                while self.text[self.i] != '"':
                    out += self.char()
                self.i += 1
                item: object = Lit(out)
            elif c == "[":
                self.i += 1
                negated = self.text[self.i] == "^"
                self.i += negated
                ranges = []
                while self.text[self.i] != "]":
                    low = self.char()
                    high = low
                    if self.text[self.i] == "-" and self.text[self.i + 1] != "]":
                        self.i += 1
                        high = self.char()
                    ranges.append((ord(low), ord(high)))
                self.i += 1
                item = Cls(negated, ranges)
            elif c == "(":
                self.i += 1
                item = self.alternatives()
                assert self.text[self.i] == ")", self.text[self.i :]
                self.i += 1
            else:
                name = re.match(r"[A-Za-z0-9-]+", self.text[self.i :])
                assert name, f"cannot read {self.text[self.i:]!r}"
                self.i += len(name.group())
                item = Ref(name.group())
            items.append(self.postfix(item))

    def postfix(self, item: object) -> object:
        if self.i >= len(self.text):
            return item
        c = self.text[self.i]
        if c in "?*+":
            self.i += 1
            return Rep(item, 1 if c == "+" else 0, 1 if c == "?" else None)
        if c == "{":
            end = self.text.index("}", self.i)
            low, _, high = self.text[self.i + 1 : end].partition(",")
            comma = "," in self.text[self.i + 1 : end]
            self.i = end + 1
            return Rep(item, int(low), (int(high) if high else None) if comma else int(low))
        return item


def parse(grammar: str) -> dict[str, Alt]:
    rules = {}
    for line in grammar.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, body = line.partition(" ::= ")
        rules[name.strip()] = Reader(body).alternatives()
    return rules


class Walker:
    """Random texts from `rules`; past `budget` characters it takes the shortest ways out."""

    POOL = [chr(c) for c in range(0x20, 0x7F)] + list("éß€中\u2028😀\t\n")

    def __init__(self, grammar: str, rng: random.Random, budget: int = 120):
        self.rules = parse(grammar)
        self.rng, self.budget = rng, budget
        self.shortest = self._shortest()

    def _height(self, node, known) -> float:
        """How deep the shallowest derivation of `node` goes (in rule references)."""
        if isinstance(node, (Lit, Cls)):
            return 0
        if isinstance(node, Ref):
            return 1 + known[node.name]
        if isinstance(node, Rep):
            return self._height(node.item, known) if node.low else 0
        return min(max([self._height(n, known) for n in option], default=0) for option in node.options)

    def _shortest(self) -> dict[str, float]:
        """Per rule, the height of its shallowest derivation: under pressure the walk takes
        the shallowest alternatives, so it always ends."""
        known = {name: math.inf for name in self.rules}
        changed = True
        while changed:
            changed = False
            for name, rule in self.rules.items():
                height = self._height(rule, known)
                if height < known[name]:
                    known[name], changed = height, True
        return known

    def text(self, root: str = "root") -> str:
        out: list[str] = []
        self._walk(Ref(root), out, 0)
        return "".join(out)

    def _pressed(self, out: list[str], depth: int) -> bool:
        return sum(map(len, out)) > self.budget or depth > 60

    def _walk(self, node, out: list[str], depth: int) -> None:
        if isinstance(node, Lit):
            out.append(node.text)
        elif isinstance(node, Cls):
            out.append(self._char(node))
        elif isinstance(node, Ref):
            self._walk(self.rules[node.name], out, depth + 1)
        elif isinstance(node, Rep):
            extra = 0 if self._pressed(out, depth) else min(self.rng.choice([0, 0, 1, 1, 2, 3, 5]), 8)
            count = node.low + extra if node.high is None else min(node.high, node.low + extra)
            for _ in range(count):
                self._walk(node.item, out, depth + 1)
        else:
            options = node.options
            if self._pressed(out, depth):
                best = min(self._height(Alt([o]), self.shortest) for o in options)
                options = [o for o in options if self._height(Alt([o]), self.shortest) == best]
            for item in self.rng.choice(options):
                self._walk(item, out, depth + 1)

    def _char(self, node: Cls) -> str:
        def inside(c: str) -> bool:
            return any(low <= ord(c) <= high for low, high in node.ranges)

        if not node.negated:
            low, high = self.rng.choice(node.ranges)
            if high - low > 200:  # a wide range: prefer characters a text would hold
                choices = [c for c in self.POOL if low <= ord(c) <= high]
                if choices:
                    return self.rng.choice(choices)
            return chr(self.rng.randint(low, high))
        choices = [c for c in self.POOL if not inside(c)]
        return self.rng.choice(choices)
