"""Metadata filters: the language (each construct, precedence, errors naming the token), the attacks
reported against `vlm serve` and `vlm index` (raw SQL reaching SQLite), time limits that fail one slow
filter alone, and a fuzz test. The oracle for every accepted filter is SQLite itself: the language is a
subset of SQL with SQL's meaning, so the same text run as raw SQL on a plain connection must select the
same ids."""

from __future__ import annotations

import random
import re
import sqlite3
import threading
import time

import numpy as np
import pytest

from retrieval.filters import (
    FILTER_MAX_CHARS,
    MAX_DEPTH,
    MAX_IN_VALUES,
    Column,
    Compare,
    FilterError,
    IsNull,
    Like,
    Literal,
    Logical,
    Not,
    parse_filter,
)
from retrieval.metadata import FILTER_TIME_LIMIT, MetadataStore, _read_only

LABELS = ["cat", "dog", "car", None, "it's"]
FOLDERS = ["animals/cats", "animals/dogs", "animalsXcats", "x/cars", "a_b/%odd"]
COLUMNS = ["id", "key", "path", "caption", "label", "folder", "size", "score"]


def _row(i: int) -> dict:
    folder = FOLDERS[i % len(FOLDERS)]
    caption = None if i % 7 == 0 else f"a {LABELS[i % 4] or 'thing'} number {i}"
    score = None if i % 11 == 0 else i / 10
    return dict(id=i, key=f"k{i}", path=f"/data/{folder}/{i}.jpg", caption=caption, label=LABELS[i % 5],
                folder=folder, size=i, score=score)  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("filters") / "metadata.sqlite"
    writer = MetadataStore(path, writable=True)
    writer.create(["label", "folder", "size", "score"])
    writer.insert(_row(i) for i in range(60))
    writer.commit()
    writer.close()
    return MetadataStore(path)


@pytest.fixture(scope="module")
def raw(store):
    """A plain connection to the same file, for the oracle: the filter text run as SQL."""
    conn = sqlite3.connect(store.path)
    yield lambda where: np.asarray(
        [r[0] for r in conn.execute(f"SELECT id FROM items WHERE ({where}) ORDER BY id")], dtype=np.int64
    )
    conn.close()


# ---- the language -------------------------------------------------------------------------------
CONSTRUCTS = [
    # (filter, ids counted by hand from _row)
    ("label = 'cat'", 12),
    ("LABEL == 'cat'", 12),
    ('"label" = \'it\'\'s\'', 12),
    ("label != 'cat'", 36),  # SQL's NULL: the 12 items without a label are neither = nor !=
    ("label <> 'cat'", 36),
    ("size < 10", 10),
    ("size <= 10", 11),
    ("size > 49.5", 10),
    ("size >= -1e1", 60),
    ("score > .5", 49),
    ("10 > size", 10),
    ("size = score", 0),
    ("label IN ('cat', 'dog')", 24),
    ("label NOT IN ('cat', 'dog')", 24),
    ("size in (1, 2.0, '3')", 2),  # '3' is text: no affinity on extra columns, as in SQL
    ("folder LIKE 'animals/%'", 24),
    ("folder like 'ANIMALS_cats'", 24),  # _ is any character, ASCII letters ignore case
    ("folder NOT LIKE 'animals/%'", 36),
    ("folder LIKE 'a!_b/!%%' ESCAPE '!'", 12),
    ("size BETWEEN 10 AND 19", 10),
    ("size NOT BETWEEN 10 AND 19", 50),
    ("size BETWEEN score AND 30", 28),  # not 0, 11, 22: no score
    ("caption IS NULL", 9),
    ("caption is not null", 51),
    ("NOT label = 'cat'", 36),
    ("label = 'cat' AND size < 30", 6),
    ("label = 'cat' OR size < 3", 14),
    ("(label = 'cat' OR label = 'dog') AND NOT folder LIKE 'x%'", 24),
    ("label IN ('cat','dog') AND NOT folder LIKE 'x%'", 24),
    ("NOT (size < 50 AND NOT size < 5)", 15),
    ("id = 3 OR key = 'k4' OR path LIKE '%/5.jpg' OR caption = 'a car number 6'", 4),
]


@pytest.mark.parametrize("where,count", CONSTRUCTS)
def test_each_construct_selects_what_sql_selects(store, raw, where, count):
    got = store.ids_where(where)
    np.testing.assert_array_equal(got, raw(where))
    assert len(got) == count


def test_precedence_is_not_over_and_over_or(store, raw):
    where = "label = 'cat' OR label = 'dog' AND NOT size < 30"
    cat, dog = (Compare(Column("label"), "=", Literal(v)) for v in ("cat", "dog"))
    small = Compare(Column("size"), "<", Literal(30))
    assert parse_filter(where, COLUMNS) == Logical("OR", (cat, Logical("AND", (dog, Not(small)))))
    np.testing.assert_array_equal(store.ids_where(where), raw(where))
    # the same conditions grouped the other way select something else
    assert len(store.ids_where(where)) == 18 and len(store.ids_where(f"({where.replace(' AND', ') AND')}")) == 12
    assert parse_filter("NOT caption IS NULL AND folder LIKE 'a%'", COLUMNS) == Logical(
        "AND", (Not(IsNull(Column("caption"))), Like(Column("folder"), "a%"))
    )


def test_existing_filters_stay_valid(store):
    # Filters in the README, the CLI help, the tests and the browser page (which quotes values with '').
    for where in (
        "folder = 'street'",
        "label = 'car'",
        "label = 'cat'",
        "label != 'red'",
        "folder LIKE 'red%'",
        "folder NOT LIKE 'red%'",
        "folder LIKE 'a/%%'",
        "label IN ('cat','dog') AND NOT folder LIKE 'x%'",
        "label = 'it''s' AND folder = 'x/cars'",
    ):
        assert isinstance(store.ids_where(where), np.ndarray)


@pytest.mark.parametrize(
    "where,token,position",
    [
        ("label = 'cat' AND ; x", "';'", 18),
        ("label = 'cat' AND colour = 'red'", "unknown column 'colour'", 18),
        ("label = 'cat' AND", "the end of the filter", 17),
        ("label = 'cat')", "unmatched ')'", 13),
        ("(label = 'cat'", "expected AND, OR or ')'", 14),
        ("label = = 'cat'", "'='", 8),
        ("label 'cat'", "\"'cat'\"", 6),
        ("label NOT = 'cat'", "after label NOT", 10),
        ("label IS 'cat'", "expected NULL after IS", 9),
        ("label = NULL", "IS NULL", 8),
        ("label IN ('a', size)", "'size'", 15),
        ("label LIKE size", "quoted string after LIKE", 11),
        ("label LIKE 'a' ESCAPE '!!'", "one character", 22),
        ("size BETWEEN 1 OR 2", "expected AND in BETWEEN", 15),
        ("label = 'cat", "never closed", 8),
        ("size = 1x", "malformed number '1x'", 7),
        ("size = 99999999999999999999", "64-bit", 7),
        ("size = 1 -- comment", "comments are not allowed", 9),
        ("lower(label) = 'cat'", "functions are not allowed: 'lower'", 0),
        ("label = '\ud800'", "not valid text", 9),
    ],
)
def test_errors_name_the_token_and_its_position(store, where, token, position):
    with pytest.raises(FilterError, match="bad filter") as caught:
        store.ids_where(where)
    message = str(caught.value)
    assert token in message and f"position {position}" in message, message
    assert caught.value.position == position


def test_errors_say_what_is_allowed(store):
    with pytest.raises(FilterError) as caught:
        store.ids_where("colour = 'red'")
    assert "label = 'cat'" in str(caught.value) and ", ".join(COLUMNS) in str(caught.value)
    for where in ("", "   ", None, 5, ["label = 'cat'"]):
        with pytest.raises(FilterError, match="empty|is a string"):
            store.ids_where(where)


def test_limits(store):
    assert len(store.ids_where("(" * MAX_DEPTH + "size < 3" + ")" * MAX_DEPTH)) == 3
    with pytest.raises(FilterError, match=f"nested more than {MAX_DEPTH}"):
        store.ids_where("(" * (MAX_DEPTH + 1) + "size < 3" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(FilterError, match=f"nested more than {MAX_DEPTH}"):
        store.ids_where("NOT " * (MAX_DEPTH + 1) + "size < 3")
    many = lambda n: "size IN (" + ",".join(str(i) for i in range(n)) + ")"  # noqa: E731
    assert len(store.ids_where(many(MAX_IN_VALUES))) == 60
    with pytest.raises(FilterError, match=f"more than {MAX_IN_VALUES} values"):
        store.ids_where(many(MAX_IN_VALUES + 1))
    with pytest.raises(FilterError, match="more than .* columns and values"):  # SQL parameters, in the end
        ones = ",".join(["1"] * 300)
        store.ids_where(f"size IN ({ones}) OR size IN ({ones},1)")
    with pytest.raises(FilterError, match=f"at most {FILTER_MAX_CHARS}"):
        store.ids_where("label = '" + "x" * FILTER_MAX_CHARS + "'")


# ---- attacks ------------------------------------------------------------------------------------
ATTACKS = [
    "1=1) UNION SELECT rowid FROM sqlite_master --",  # reported: reads other tables
    "id IN (SELECT a.id FROM items a, items b, items c, items d, items e WHERE a.id+b.id+c.id+d.id+e.id = -1)",
    "length(randomblob(9000)) > 0",  # reported with 900000000: 22 s and 1.7 GB
    "label = 'cat'; DROP TABLE items",
    "label = 'cat' -- ignore the rest",
    "label = 'cat' /* comment */",
    "id IN (SELECT name FROM pragma_table_info('items'))",
    "EXISTS (SELECT 1 FROM sqlite_master)",
    "label = (SELECT label FROM items LIMIT 1)",
    "abs(size) > 1",
    "load_extension('x') IS NULL",
    "label = 'c' || 'at'",
    "size + 1 > 2",
    "CAST(size AS TEXT) = '1'",
    "CASE WHEN size > 1 THEN 1 END = 1",
    "label = 'cat' COLLATE NOCASE",
    "label GLOB 'c*'",
    "label REGEXP 'c.*'",
    "rowid > 0",
    "items.size > 0",
    "size = ?",
    "size = :x",
    "label = x'636174'",
    "\"sqlite_master\" IS NOT NULL",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_sql_outside_the_language_is_refused(store, attack):
    with pytest.raises(FilterError, match="bad filter"):
        store.ids_where(attack)


def test_the_authorizer_allows_reading_items_and_like_only(store):
    # Defence in depth behind the parser: attack the guard itself, on a connection that runs raw SQL.
    conn = sqlite3.connect(f"{store.path.as_uri()}?mode=ro", uri=True)
    conn.set_authorizer(_read_only)
    assert conn.execute("SELECT id FROM items WHERE folder LIKE ? ESCAPE ?", ("x%", "!")).fetchall()
    for sql in (
        "SELECT id FROM items WHERE id IN (SELECT rowid FROM sqlite_master)",
        "SELECT id FROM items WHERE length(randomblob(10)) > 0",
        "SELECT id FROM items WHERE abs(size) > 1",
        "SELECT id FROM items WHERE id IN (SELECT cid FROM pragma_table_info('items'))",
    ):
        with pytest.raises(sqlite3.DatabaseError, match="not authorized|prohibited"):
            conn.execute(sql).fetchall()
    conn.close()


# ---- time limits --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """200,000 items; captions that LIKE '%...%' has to scan to the end."""
    path = tmp_path_factory.mktemp("big") / "metadata.sqlite"
    writer = MetadataStore(path, writable=True)
    writer.create(["label"])
    rows = ((i, f"k{i}", f"/data/{i}.jpg", f"a photo of thing {i} " * 3, "cat") for i in range(200_000))
    writer.conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", rows)  # store.insert: 10x slower
    writer.commit()
    writer.close()
    return path


# Valid and within every limit, and seconds of work on `big`: 60 unanchored patterns per row.
SLOW = " OR ".join(f"caption LIKE '%q{j}x%'" for j in range(60))


def test_a_slow_filter_times_out_alone(big):
    store = MetadataStore(big, time_limit=0.3)
    errors, took = [], []

    def slow() -> None:
        started = time.perf_counter()
        with pytest.raises(FilterError, match=r"took longer than 0.3 s; make it simpler") as caught:
            store.ids_where(SLOW)
        took.append(time.perf_counter() - started)
        errors.append(caught.value)

    threads = [threading.Thread(target=slow) for _ in range(store.read_connections - 1)]  # every filter slot
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    started = time.perf_counter()
    items = store.get_many([5, -1, 7])
    answered = time.perf_counter() - started
    for thread in threads:
        thread.join()
    assert [item.key if item else None for item in items] == ["k5", None, "k7"]
    assert answered < 0.1, f"get_many waited {answered:.2f} s behind the slow filters"
    assert len(errors) == len(threads) and max(took) < 0.3 + 0.5, took
    assert len(store.ids_where("id < 10")) == 10  # the store still answers filters


def test_a_filter_waits_for_a_slot_no_longer_than_its_time_limit(store):
    limited = MetadataStore(store.path, time_limit=0.2)
    pool = limited._pool()
    held = [pool.lend(for_filter=True) for _ in range(limited.read_connections - 1)]
    for lent in held:
        lent.__enter__()
    try:
        started = time.perf_counter()
        with pytest.raises(FilterError, match="could not start within 0.2 s"):
            limited.ids_where("label = 'cat'")
        assert 0.15 < time.perf_counter() - started < 1.0
        assert limited.get(3).key == "k3"  # the connection kept for lookups
    finally:
        for lent in held:
            lent.__exit__(None, None, None)
    assert len(limited.ids_where("label = 'cat'")) == 12


def test_close_interrupts_a_running_query_instead_of_waiting(big):
    store = MetadataStore(big, time_limit=None)
    caught = []

    def slow() -> None:
        try:
            store.ids_where(SLOW)
        except sqlite3.ProgrammingError as err:
            caught.append((err, time.perf_counter()))

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.2)
    started = time.perf_counter()
    store.close()
    closed = time.perf_counter() - started
    thread.join(timeout=30)
    assert closed < 0.1, f"close() waited {closed:.2f} s for the running query"
    assert caught and "closed" in str(caught[0][0]) and caught[0][1] - started < 0.5
    assert store.count() == 200_000  # the next use opens new connections


# ---- fuzz ---------------------------------------------------------------------------------------
VOCABULARY = (
    ["AND", "OR", "NOT", "IN", "LIKE", "BETWEEN", "IS", "NULL", "ESCAPE", "and", "Not", "like", "null"]
    + ["label", "Folder", '"size"', "score", "caption", "id", "key", '"la""bel"', "colour"]
    + ["=", "==", "!=", "<>", "<", "<=", ">", ">=", "(", ")", ",", "(", ")"]
    + ["'cat'", "'it''s'", "'animals/%'", "'%a_'", "'!'", "''", "1", "-2", "3.5", ".5", "1e3", "7."]
)
GARBAGE = (
    [";", "--", "/*", "*/", "||", "+", "-", "*", ".", "?", ":x", "@", "$", "[", "]", "`", '"', "'", "\\"]
    + ["\x00", "\ud800", "é", "\v", "\t", "\n", "SELECT", "UNION", "FROM", "sqlite_master", "rowid"]
    + ["randomblob(", "abs(", "x'00'", "99999999999999999999", "1abc", "1e999", "GLOB", "COLLATE"]
)


def _random_filter(rng: random.Random, depth: int = 0) -> str:
    roll = rng.random()
    if depth < 3 and roll < 0.25:
        op = rng.choice(["AND", "OR", "and", "or"])
        return f"{_random_filter(rng, depth + 1)} {op} {_random_filter(rng, depth + 1)}"
    if depth < 3 and roll < 0.35:
        return f"NOT {_random_filter(rng, depth + 1)}"
    if depth < 3 and roll < 0.45:
        return f"({_random_filter(rng, depth + 1)})"
    column = rng.choice(["label", "folder", "size", "score", "caption", '"size"', "id"])
    values = ["'cat'", "'dog'", "'it''s'", "'animals/cats'", "3", "-1", "2.5", "20", "1e1"]
    value = lambda: rng.choice(values)  # noqa: E731
    return rng.choice(
        [
            f"{column} {rng.choice(['=', '==', '!=', '<>', '<', '<=', '>', '>='])} {value()}",
            f"{column} {rng.choice(['IN', 'NOT IN'])} ({', '.join(value() for _ in range(rng.randint(1, 4)))})",
            f"{column} {rng.choice(['LIKE', 'NOT LIKE'])} {rng.choice(['%a%', 'animals/%', '_a%', 'a!%%'])!r}"
            + rng.choice(["", " ESCAPE '!'"]),
            f"{column} {rng.choice(['BETWEEN', 'NOT BETWEEN'])} {value()} AND {value()}",
            f"{column} IS {rng.choice(['', 'NOT '])}NULL",
        ]
    )


def _mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(0, 3)):
        at = rng.randint(0, len(text))
        token = rng.choice(VOCABULARY + GARBAGE)
        before, after = text[:at], text[at:]
        text = rng.choice([f"{before} {token} {after}", before + token + after, before + after[3:]])
    return text


def _outside_the_language(text: str) -> list[str]:
    """Pieces of `text` that no filter may contain, found without the parser: words that are neither
    keywords nor columns, and characters outside strings that are no operator or punctuation."""
    literals = r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    rest = re.sub(literals, " ", text)
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest)
    allowed = {"AND", "OR", "NOT", "IN", "LIKE", "BETWEEN", "IS", "NULL", "ESCAPE"} | {c.upper() for c in COLUMNS}
    symbols = re.sub(r"[A-Za-z0-9_]|[ \t\n\r\f=<>!(),]", "", rest)
    return [w for w in words if w.upper() not in allowed] + list(symbols)


def test_fuzz_either_the_sql_answer_or_a_filter_error(store, raw):
    rng = random.Random(0)
    accepted = refused = 0
    for case in range(3000):
        if case % 2:
            text = _mutate(rng, _random_filter(rng))
        else:
            text = rng.choice(["", " ", "\n"]).join(rng.choice(VOCABULARY + GARBAGE) for _ in range(rng.randint(1, 12)))
        started = time.perf_counter()
        try:
            got = store.ids_where(text)
        except FilterError:
            refused += 1
        else:
            accepted += 1
            assert not _outside_the_language(text), (text, _outside_the_language(text))
            if "\x00" not in text:  # a string may hold NUL; SQL text may not
                np.testing.assert_array_equal(got, raw(text), err_msg=text)
        assert time.perf_counter() - started < FILTER_TIME_LIMIT, text
    assert accepted > 300 and refused > 1000, (accepted, refused)
