"""Client-given regexes (PEFT's target_modules, rank_pattern, ...) matched without backtracking.

Python's `re` backtracks while holding the GIL: `(?:.|.){24}Z` takes seconds and doubles
with each repeat, and sequences like `.*.*.*.*.*Z` grow as a power of the name's length, so
one adapter_config.json could freeze the whole server. Here a pattern is parsed once with
`re`'s own parser (same syntax, same errors) and matched by carrying the *set* of positions
reachable in the name through the parse tree. Each node then runs once per position instead
of once per path, so the work is about pattern size x name length (each nested quantifier
multiplies by at most the name's length). A `Budget` shared by all of an adapter's matches
bounds even that, so no pattern can run long.

Only whether a pattern matches is computed, and that is exactly `re`'s answer for the
constructs kept here. Constructs whose answer depends on backtracking order or on earlier
captures (backreferences, lookarounds, conditionals, atomic groups, possessive quantifiers)
and flags that change what a character matches are refused, with a message naming them.
Names matched are module paths such as "model.layers.3.self_attn.q_proj": no newlines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

try:  # Python >= 3.11
    import re._parser as _sre
except ImportError:  # pragma: no cover - older Pythons
    import sre_parse as _sre  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000
MAX_REPEAT_COUNT = 1000  # {m,n}: module paths are far shorter
# ~0.1-0.5 s of matching at worst; real configs need a few thousand steps per adapter
DEFAULT_BUDGET = 1_000_000

_C = _sre  # the opcodes live on the parser module (imported from re._constants)
_REFUSED_OPS = {
    _C.GROUPREF: "backreferences",
    _C.GROUPREF_EXISTS: "conditional groups",
    _C.ASSERT: "lookahead / lookbehind assertions",
    _C.ASSERT_NOT: "negative lookahead / lookbehind assertions",
}
for _name, _why in (("ATOMIC_GROUP", "atomic groups"), ("POSSESSIVE_REPEAT", "possessive quantifiers")):
    if hasattr(_C, _name):
        _REFUSED_OPS[getattr(_C, _name)] = _why
_REFUSED_FLAGS = _C.SRE_FLAG_IGNORECASE | _C.SRE_FLAG_LOCALE | _C.SRE_FLAG_MULTILINE | _C.SRE_FLAG_DOTALL
_REPEATS = (_C.MAX_REPEAT, _C.MIN_REPEAT)  # lazy or greedy: the same answer to "does it match"
_CHAR_OPS = (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN)  # nodes that match one character


class UnsafePatternError(ValueError):
    """A pattern that is invalid, or that cannot be matched in bounded time; says why."""


class Budget:
    """Steps of matching left for one adapter's patterns; running out is an UnsafePatternError."""

    def __init__(self, steps: int = DEFAULT_BUDGET):
        self.left = steps
        self.total = steps

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise UnsafePatternError(
                f"the patterns are too expensive to match (more than {self.total} steps over the "
                "module names); simplify them, e.g. list the module names"
            )


@dataclass(frozen=True)
class SafePattern:
    """A checked pattern; `match` / `fullmatch` answer as `re.match` / `re.fullmatch` would."""

    source: str
    nodes: list  # see _lower

    def match(self, name: str, budget: Budget) -> bool:
        return bool(_run(self.nodes, name, {0}, budget))

    def fullmatch(self, name: str, budget: Budget) -> bool:
        return len(name) in _run(self.nodes, name, {0}, budget)


def compile_pattern(source: str) -> SafePattern:
    """Parse and check `source`; UnsafePatternError if invalid or not matchable here."""
    if len(source) > MAX_PATTERN_CHARS:
        raise UnsafePatternError(f"the pattern is longer than {MAX_PATTERN_CHARS} characters")
    try:
        tree = _sre.parse(source)
    except (re.error, RecursionError, OverflowError) as e:
        raise UnsafePatternError(f"not a valid regular expression ({_reason(e)})") from None
    if tree.state.flags & _REFUSED_FLAGS:
        raise UnsafePatternError("flags (?i) (?L) (?m) (?s) are not supported")
    _check(tree)
    return SafePattern(source, _lower(tree))


def _reason(e: Exception) -> str:
    # re.error's own text quotes at most the pattern, which the client wrote
    return e.msg if isinstance(e, re.error) else type(e).__name__


def _check(nodes) -> None:
    for op, av in nodes:
        if op in _REFUSED_OPS:
            raise UnsafePatternError(f"{_REFUSED_OPS[op]} are not supported")
        if op is _C.SUBPATTERN:
            if av[1] & _REFUSED_FLAGS:
                raise UnsafePatternError("flags (?i) (?L) (?m) (?s) are not supported")
            _check(av[3])
        elif op is _C.BRANCH:
            for alternative in av[1]:
                _check(alternative)
        elif op in _REPEATS:
            if max(av[0], av[1] if av[1] != _C.MAXREPEAT else 0) > MAX_REPEAT_COUNT:
                raise UnsafePatternError(f"repeat counts above {MAX_REPEAT_COUNT} are not supported")
            _check(av[2])
        elif op is _C.IN:
            _check_class(av)
        elif op not in _CHAR_OPS and op is not _C.AT:
            raise UnsafePatternError(f"the construct {op} is not supported")


def _check_class(items) -> None:
    for op, av in items:
        if op is _C.CATEGORY and _NOT_CATEGORIES.get(av, av) in _CATEGORIES:
            continue
        if op not in (_C.NEGATE, _C.LITERAL, _C.RANGE):  # others come only with refused flags
            raise UnsafePatternError(f"the character class item {op} {av} is not supported")


# ----------------------------------------------------------------------------------------
# Lowering re's tree to the few nodes matched here:
#   ("text", str)                  a run of literal characters
#   ("char", ascii set, predicate) one character: looked up in the set if ASCII (module names)
#   ("at", code)                   ^ $ \A \Z \b \B
#   ("alt", [nodes, ...])          alternatives
#   ("rep", low, high, nodes, one) a quantifier; `one` is the ("char", ...) node if the body is
#                                  a single character, matched in one pass over the name
# ----------------------------------------------------------------------------------------


def _lower(tree) -> list:
    out: list = []
    for op, av in tree:
        if op is _C.SUBPATTERN:  # groups capture nothing here: only "does it match" is asked
            for node in _lower(av[3]):
                _append(out, node)
        elif op is _C.LITERAL:
            _append(out, ("text", chr(av)))
        elif op in _CHAR_OPS:
            out.append(_char_node(op, av))
        elif op is _C.AT:
            out.append(("at", av))
        elif op is _C.BRANCH:
            out.append(("alt", [_lower(alternative) for alternative in av[1]]))
        else:  # a repeat (_check refused everything else)
            low, high, body = av
            nodes = _lower(body)
            one = _as_char(nodes[0]) if len(nodes) == 1 else None
            out.append(("rep", low, high, nodes, one))
    return out


def _append(out: list, node: tuple) -> None:
    if node[0] == "text" and out and out[-1][0] == "text":
        out[-1] = ("text", out[-1][1] + node[1])
    else:
        out.append(node)


def _as_char(node: tuple) -> tuple | None:
    if node[0] == "char":
        return node
    if node[0] == "text" and len(node[1]) == 1:
        return _char_node(_C.LITERAL, ord(node[1]))
    return None


def _char_node(op, av) -> tuple:
    def predicate(ch: str) -> bool:
        return _char_matches(op, av, ch)

    return ("char", frozenset(c for c in map(chr, range(128)) if predicate(c)), predicate)


def _accepts(node: tuple, ch: str) -> bool:
    return ch in node[1] if ch < "\x80" else node[2](ch)


# ----------------------------------------------------------------------------------------
# Matching: the set of positions reachable after each node
# ----------------------------------------------------------------------------------------


def _run(nodes: list, s: str, positions: set[int], budget: Budget) -> set[int]:
    for node in nodes:
        if not positions:
            break
        budget.spend(len(positions))
        kind = node[0]
        if kind == "text":
            text = node[1]
            positions = {p + len(text) for p in positions if s.startswith(text, p)}
        elif kind == "char":
            positions = {p + 1 for p in positions if p < len(s) and _accepts(node, s[p])}
        elif kind == "at":
            positions = {p for p in positions if _at(node[1], s, p)}
        elif kind == "alt":
            positions = set().union(*(_run(alternative, s, positions, budget) for alternative in node[1]))
        elif node[4] is not None:
            positions = _repeat_char(node, s, positions, budget)
        else:
            positions = _repeat(node, s, positions, budget)
    return positions


def _repeat_char(node: tuple, s: str, positions: set[int], budget: Budget) -> set[int]:
    """A quantified single character: from p, every end between p + low and the run's end."""
    _, low, high, _, one = node
    run = [0] * (len(s) + 1)  # run[p]: how many characters from p on the node accepts
    for p in range(len(s) - 1, -1, -1):
        run[p] = run[p + 1] + 1 if _accepts(one, s[p]) else 0
    budget.spend(len(s))
    reached: set[int] = set()
    for p in positions:
        longest = min(run[p], high)
        if longest >= low:
            reached.update(range(p + low, p + longest + 1))
    budget.spend(len(reached))
    return reached


def _repeat(node: tuple, s: str, positions: set[int], budget: Budget) -> set[int]:
    _, low, high, body, _ = node
    for _ in range(low):
        if not positions:
            return positions
        budget.spend(1)  # an empty body still costs: `(?:){1000000000}` must run out
        positions = _run(body, s, positions, budget)
    # then up to high - low more: a position reached again adds nothing (it has fewer
    # repeats left than the first time), so this stops after at most len(s) + 1 rounds
    reached, frontier, count = set(positions), positions, low
    while frontier and (high == _C.MAXREPEAT or count < high):
        budget.spend(1)
        frontier = _run(body, s, frontier, budget) - reached
        reached |= frontier
        count += 1
    return reached


def _at(code, s: str, p: int) -> bool:
    if code in (_C.AT_BEGINNING, _C.AT_BEGINNING_STRING):
        return p == 0
    if code is _C.AT_END:
        return p == len(s) or (p == len(s) - 1 and s[p] == "\n")
    if code is _C.AT_END_STRING:
        return p == len(s)
    boundary = (p > 0 and _is_word(s[p - 1])) != (p < len(s) and _is_word(s[p]))
    return boundary if code is _C.AT_BOUNDARY else not boundary


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES = {
    _C.CATEGORY_DIGIT: str.isdecimal,
    _C.CATEGORY_SPACE: str.isspace,
    _C.CATEGORY_WORD: _is_word,
}
_NOT_CATEGORIES = {
    _C.CATEGORY_NOT_DIGIT: _C.CATEGORY_DIGIT,
    _C.CATEGORY_NOT_SPACE: _C.CATEGORY_SPACE,
    _C.CATEGORY_NOT_WORD: _C.CATEGORY_WORD,
}


def _char_matches(op, av, ch: str) -> bool:
    if op is _C.ANY:
        return ch != "\n"
    if op is _C.LITERAL:
        return ord(ch) == av
    if op is _C.NOT_LITERAL:
        return ord(ch) != av
    return _in_class(av, ch)


def _in_class(items, ch: str) -> bool:
    negate = bool(items) and items[0][0] is _C.NEGATE
    code, found = ord(ch), False
    for op, av in items[negate:]:
        if op is _C.LITERAL:
            found = code == av
        elif op is _C.RANGE:
            found = av[0] <= code <= av[1]
        elif op is _C.CATEGORY:
            positive = _NOT_CATEGORIES.get(av, av)
            found = _CATEGORIES[positive](ch) != (positive is not av)
        # (NEGATE only comes first; _check_class refused every other item)
        if found:
            break
    return found != negate

