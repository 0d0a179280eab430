"""Metadata filters: a small language, parsed into a tree and compiled to parameterised SQL.

A filter is what users write after ``--where`` or in the service's ``where=``. It never reaches SQLite as
text: it is tokenized, parsed into the dataclasses below, and compiled to SQL whose columns are checked
against the table and quoted, and whose values are parameters. The language is a subset of SQL's
boolean expressions, with SQL's meaning (NULL included: ``label != 'cat'`` skips items without a label)::

    filter    := or_expr
    or_expr   := and_expr ( OR and_expr )*
    and_expr  := not_expr ( AND not_expr )*
    not_expr  := NOT not_expr | "(" or_expr ")" | predicate
    predicate := operand ( compare operand
                         | [NOT] IN "(" literal ( "," literal )* ")"
                         | [NOT] LIKE string [ ESCAPE string ]
                         | [NOT] BETWEEN operand AND operand
                         | IS [NOT] NULL )
    compare   := "=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    operand   := column | literal
    literal   := string | integer | float      'it''s' (a quote doubled), 42, -7, 0.5, 1e3
    column    := a metadata column, bare (label) or double-quoted ("label")

Keywords and column names are case-insensitive; precedence is NOT > AND > OR. In LIKE, % matches any
run of characters and _ one character (ASCII letters ignore case), so ``folder LIKE 'animals/%'`` is the
prefix test. Examples: ``label = 'cat'``, ``label IN ('cat', 'dog') AND NOT folder LIKE 'x%'``,
``width BETWEEN 100 AND 200 OR caption IS NULL``.

Limits keep every filter cheap to parse and bounded in what it asks of SQLite: `FILTER_MAX_CHARS`
characters, `MAX_DEPTH` nested parentheses or NOTs, `MAX_IN_VALUES` values in one IN list and
`MAX_TERMS` columns and values in all. Anything else raises `FilterError` (a ValueError) that names the
offending token, its position, and what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, NoReturn, Sequence, Union

__all__ = [
    "FilterError",
    "SqlFilter",
    "parse_filter",
    "filter_sql",
    "compile_filter",
    "Column",
    "Literal",
    "Compare",
    "In",
    "Like",
    "Between",
    "IsNull",
    "Not",
    "Logical",
]

FILTER_MAX_CHARS = 2000
MAX_DEPTH = 32
MAX_IN_VALUES = 500
# Each value becomes one SQL parameter: 600 stays under SQLite's historical limit of 999 parameters.
MAX_TERMS = 600

KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "LIKE", "ESCAPE", "BETWEEN", "IS", "NULL"})
COMPARISONS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_INT64 = (-(2**63), 2**63 - 1)
# Whitespace as SQLite's tokenizer has it (no vertical tab); ASCII digits only.
_TOKEN = re.compile(
    r"""(?P<space>[ \t\n\f\r]+)
      | (?P<string>'(?:[^']|'')*')
      | (?P<name>"(?:[^"]|"")*")
      | (?P<number>-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op><=|>=|<>|!=|==|[=<>])
      | (?P<punct>[(),])""",
    re.VERBOSE,
)
_HELP = (
    "Filters compare metadata columns with values, e.g. label = 'cat', folder LIKE 'animals/%', "
    "size BETWEEN 1 AND 9, label IN ('cat', 'dog'), caption IS NULL, combined with AND, OR, NOT and "
    "parentheses; strings are in single quotes"
)

Value = Union[str, int, float]


class FilterError(ValueError):
    """A filter outside the language or its limits; `position` is the offset of the offending token."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


# ---- the tree -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A metadata column, by its name in the table."""

    name: str


@dataclass(frozen=True)
class Literal:
    """A string, integer or float value."""

    value: Value


Operand = Union[Column, Literal]


@dataclass(frozen=True)
class Compare:
    """``left op right`` with op one of =, !=, <, <=, >, >= (== and <> are spelled = and !=)."""

    left: Operand
    op: str
    right: Operand


@dataclass(frozen=True)
class In:
    """``operand [NOT] IN (values)``."""

    operand: Operand
    values: tuple[Value, ...]
    negated: bool = False


@dataclass(frozen=True)
class Like:
    """``operand [NOT] LIKE pattern [ESCAPE escape]``."""

    operand: Operand
    pattern: str
    escape: str | None = None
    negated: bool = False


@dataclass(frozen=True)
class Between:
    """``operand [NOT] BETWEEN low AND high`` (both ends included)."""

    operand: Operand
    low: Operand
    high: Operand
    negated: bool = False


@dataclass(frozen=True)
class IsNull:
    """``operand IS [NOT] NULL``."""

    operand: Operand
    negated: bool = False


@dataclass(frozen=True)
class Not:
    """``NOT child``."""

    child: "Node"


@dataclass(frozen=True)
class Logical:
    """``children[0] op children[1] op ...`` with op AND or OR."""

    op: str
    children: tuple["Node", ...]


Node = Union[Compare, In, Like, Between, IsNull, Not, Logical]


@dataclass(frozen=True)
class SqlFilter:
    """A compiled filter: an SQL condition with ``?`` placeholders, and their values in order."""

    sql: str
    params: tuple[Value, ...]


# ---- tokens -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Token:
    kind: str  # string, name, number, word, op, punct, end
    text: str
    position: int
    value: Value | None = None

    @property
    def keyword(self) -> str | None:
        return self.text.upper() if self.kind == "word" and self.text.upper() in KEYWORDS else None

    def describe(self) -> str:
        what = "the end of the filter" if self.kind == "end" else repr(_clip(self.text))
        return f"{what} at position {self.position}"


def _tokens(text: str) -> Iterator[_Token]:
    """The tokens of `text`, then an end token; lazily, so that errors come in reading order."""
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            problem = f"unexpected character {text[position]!r} at position {position}{_hint(text, position)}"
            raise _error(text, problem, position)
        kind, token = match.lastgroup, match.group()
        if kind == "number" and text[match.end() : match.end() + 1].isalnum():
            bad = re.match(r"[A-Za-z0-9_.]*", text[position:]).group()
            raise _error(text, f"malformed number {_clip(bad)!r} at position {position}", position)
        if kind != "space":
            yield _Token(kind, token, position, _token_value(text, kind, token, position))
        position = match.end()
    yield _Token("end", "", len(text))


def _token_value(text: str, kind: str, token: str, position: int) -> Value | None:
    if kind in ("string", "name"):
        return token[1:-1].replace(token[0] * 2, token[0])
    if kind != "number":
        return None
    if re.fullmatch(r"-?[0-9]+", token):
        value = int(token)
        if not _INT64[0] <= value <= _INT64[1]:
            raise _error(text, f"integer {_clip(token)} at position {position} is outside the 64-bit range", position)
        return value
    value = float(token)
    if not math.isfinite(value):
        raise _error(text, f"number {_clip(token)} at position {position} is too large", position)
    return value


def _hint(text: str, position: int) -> str:
    char = text[position]
    if char == "'":
        return " (a string that is never closed; write a quote inside a string as '')"
    if char == '"':
        return ' (a quoted column name that is never closed)'
    if text.startswith(("--", "/*"), position):
        return " (comments are not allowed)"
    if char == ";":
        return " (a filter is one condition, not SQL statements)"
    return ""


# ---- parsing ------------------------------------------------------------------------------------
def parse_filter(text: str, columns: Sequence[str]) -> Node:
    """The tree of filter `text` over the metadata `columns` (matched case-insensitively; the tree holds
    their names as in the table); FilterError naming the offending token and position otherwise."""
    if not isinstance(text, str):
        got = f"{type(text).__name__} {_clip(repr(text))}"
        raise FilterError(f"a filter is a string such as \"label = 'cat'\", got {got}")
    if not text.strip():
        raise FilterError(f"the filter is empty. {_HELP}")
    if len(text) > FILTER_MAX_CHARS:
        raise FilterError(f"the filter has {len(text)} characters; at most {FILTER_MAX_CHARS} are allowed")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        problem = f"character {text[err.start]!r} at position {err.start} is not valid text"
        raise _error(text, problem, err.start) from None
    return _Parser(text, _tokens(text), columns).parse()


def filter_sql(node: Node) -> SqlFilter:
    """`node` as an SQL condition over quoted columns, with every value a ``?`` parameter."""
    params: list[Value] = []
    return SqlFilter(_sql(node, params), tuple(params))


def compile_filter(text: str, columns: Sequence[str]) -> SqlFilter:
    """`parse_filter` then `filter_sql`: the SQL condition and parameters of filter `text`."""
    return filter_sql(parse_filter(text, columns))


class _Parser:
    """Recursive descent over the grammar in the module docstring; `depth` counts open parentheses and NOTs."""

    def __init__(self, text: str, tokens: Iterator[_Token], columns: Sequence[str]) -> None:
        self.text, self.tokens = text, tokens
        self.peek = next(tokens)
        self.columns = {c.lower(): c for c in columns}
        self.names = ", ".join(columns)
        self.terms = 0

    def parse(self) -> Node:
        node = self.or_expr(0)
        if self.peek.text == ")":
            self.fail(f"unmatched {self.peek.describe()}")
        if self.peek.kind != "end":
            self.fail(f"expected AND, OR or the end of the filter, got {self.peek.describe()}")
        return node

    def or_expr(self, depth: int) -> Node:
        children = [self.and_expr(depth)]
        while self.keyword("OR"):
            children.append(self.and_expr(depth))
        return children[0] if len(children) == 1 else Logical("OR", tuple(children))

    def and_expr(self, depth: int) -> Node:
        children = [self.not_expr(depth)]
        while self.keyword("AND"):
            children.append(self.not_expr(depth))
        return children[0] if len(children) == 1 else Logical("AND", tuple(children))

    def not_expr(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            self.fail(f"{self.peek.describe()} is nested more than {MAX_DEPTH} parentheses or NOTs deep")
        if self.keyword("NOT"):
            return Not(self.not_expr(depth + 1))
        if self.punct("("):
            node = self.or_expr(depth + 1)
            if not self.punct(")"):
                self.fail(f"expected AND, OR or ')', got {self.peek.describe()}")
            return node
        return self.predicate()

    def predicate(self) -> Node:
        operand = self.operand()
        if self.peek.kind == "op":
            op = COMPARISONS[self.next().text]
            return Compare(operand, op, self.operand())
        if self.keyword("IS"):
            negated = self.keyword("NOT")
            if not self.keyword("NULL"):
                self.fail(f"expected NULL after IS{' NOT' if negated else ''}, got {self.peek.describe()}")
            return IsNull(operand, negated)
        negated = self.keyword("NOT")
        if self.keyword("IN"):
            return In(operand, self.in_values(), negated)
        if self.keyword("LIKE"):
            pattern = self.string("LIKE")
            escape = self.escape() if self.keyword("ESCAPE") else None
            return Like(operand, pattern, escape, negated)
        if self.keyword("BETWEEN"):
            low = self.operand()
            if not self.keyword("AND"):
                self.fail(f"expected AND in BETWEEN ... AND ..., got {self.peek.describe()}")
            return Between(operand, low, self.operand(), negated)
        allowed = "IN, LIKE or BETWEEN" if negated else "a comparison (= != <> < <= > >=), IN, LIKE, BETWEEN or IS"
        self.fail(f"expected {allowed} after {_describe(operand)}{' NOT' * negated}, got {self.peek.describe()}")

    def operand(self) -> Operand:
        token = self.next()
        self.count_term(token)
        if token.kind in ("string", "number"):
            return Literal(token.value)
        if token.keyword == "NULL":
            self.fail(f"NULL is not a value to compare with ({token.describe()}): write IS NULL or IS NOT NULL", token)
        if token.kind == "word" and token.keyword is None and self.peek.text == "(":
            self.fail(f"functions are not allowed: {token.describe()}", token)
        if token.kind == "name" or (token.kind == "word" and token.keyword is None):
            return Column(self.column(token))
        self.fail(f"expected a column or a value, got {token.describe()}", token)

    def column(self, token: _Token) -> str:
        name = token.value if token.kind == "name" else token.text
        if name.lower() not in self.columns:
            self.fail(f"unknown column {token.describe()}", token)
        return self.columns[name.lower()]

    def in_values(self) -> tuple[Value, ...]:
        if not self.punct("("):
            self.fail(f"expected '(' after IN, got {self.peek.describe()}")
        values = []
        while True:
            token = self.next()
            if token.kind not in ("string", "number"):
                self.fail(f"IN lists hold strings and numbers only, got {token.describe()}", token)
            self.count_term(token)
            values.append(token.value)
            if len(values) > MAX_IN_VALUES:
                self.fail(f"more than {MAX_IN_VALUES} values in one IN list (at position {token.position})", token)
            if self.punct(")"):
                return tuple(values)
            if not self.punct(","):
                self.fail(f"expected ',' or ')' in the IN list, got {self.peek.describe()}")

    def string(self, after: str) -> str:
        token = self.next()
        if token.kind != "string":
            self.fail(f"expected a quoted string after {after}, got {token.describe()}", token)
        self.count_term(token)
        return token.value

    def escape(self) -> str:
        token = self.peek
        escape = self.string("ESCAPE")
        if len(escape) != 1:
            self.fail(f"the ESCAPE string must be one character, got {token.describe()}", token)
        return escape

    # ---- token helpers
    def next(self) -> _Token:
        token = self.peek
        if token.kind != "end":
            self.peek = next(self.tokens)
        return token

    def keyword(self, word: str) -> bool:
        if self.peek.keyword == word:
            self.next()
            return True
        return False

    def punct(self, char: str) -> bool:
        if self.peek.kind == "punct" and self.peek.text == char:
            self.next()
            return True
        return False

    def count_term(self, token: _Token) -> None:
        self.terms += 1
        if self.terms > MAX_TERMS:
            self.fail(f"more than {MAX_TERMS} columns and values (at {token.describe()})", token)

    def fail(self, problem: str, token: _Token | None = None) -> NoReturn:
        token = token or self.peek
        raise _error(self.text, f"{problem}. {_HELP}; the columns are {self.names}", token.position)


# ---- SQL ----------------------------------------------------------------------------------------
def _sql(node: Node, params: list[Value]) -> str:
    if isinstance(node, Logical):
        return "(" + f" {node.op} ".join(_sql(child, params) for child in node.children) + ")"
    if isinstance(node, Not):
        return f"(NOT {_sql(node.child, params)})"
    if isinstance(node, Compare):
        return f"({_operand(node.left, params)} {node.op} {_operand(node.right, params)})"
    if isinstance(node, IsNull):
        return f"({_operand(node.operand, params)} IS {'NOT ' * node.negated}NULL)"
    not_ = "NOT " * node.negated
    left = _operand(node.operand, params)
    if isinstance(node, In):
        params.extend(node.values)
        return f"({left} {not_}IN ({', '.join('?' * len(node.values))}))"
    if isinstance(node, Like):
        params.append(node.pattern)
        if node.escape is not None:
            params.append(node.escape)
        return f"({left} {not_}LIKE ?{' ESCAPE ?' * (node.escape is not None)})"
    if isinstance(node, Between):
        return f"({left} {not_}BETWEEN {_operand(node.low, params)} AND {_operand(node.high, params)})"
    raise TypeError(f"not a filter node: {node!r}")


def _operand(operand: Operand, params: list[Value]) -> str:
    if isinstance(operand, Column):
        return '"' + operand.name.replace('"', '""') + '"'
    params.append(operand.value)
    return "?"


def _describe(operand: Operand) -> str:
    return operand.name if isinstance(operand, Column) else repr(operand.value)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(text: str, problem: str, position: int) -> FilterError:
    return FilterError(f"bad filter {_clip(text, 200)!r}: {problem}", position)
