"""Metadata filters: parse once (errors name the field), answer with the set of matching keys.

A filter is a JSON object; its fields are ANDed:

    {"genre": "jazz"}                         equality (str, number, bool or null)
    {"genre": {"$eq": "jazz"}}                the same
    {"genre": {"$ne": "jazz"}}                not equal (items without the field match)
    {"genre": {"$in": ["jazz", "blues"]}}     one of
    {"genre": {"$nin": ["jazz", "blues"]}}    none of (items without the field match)
    {"year": {"$gte": 1990, "$lt": 2000}}     numeric ranges: $gt $gte $lt $lte (numbers only)

A metadata value that is a list matches $eq/$in when any element does (tags), as in MongoDB.
Numbers compare by value (1 == 1.0); booleans are not numbers (true != 1); strings never equal numbers.

`MetadataIndex` keeps postings (field -> value -> keys) for the scalar values and list elements of every
item's metadata, so $eq/$in are set lookups; the other operators check the candidates' metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RANGE_OPS = {"$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b, "$lt": lambda a, b: a < b,
             "$lte": lambda a, b: a <= b}  # fmt: skip
OPERATORS = ("$eq", "$ne", "$in", "$nin", *RANGE_OPS)
MAX_IN_VALUES = 1024


class FilterError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _tag(value: Any) -> tuple[str, Any] | None:
    """A hashable, type-aware key for a scalar metadata value; None for values that have no equality here."""
    if value is None:
        return ("z", None)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", float(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        return ("s", value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class FieldCondition:
    field: str
    eq: tuple[str, Any] | None = None  # $eq
    one_of: frozenset | None = None  # $in
    not_eq: tuple[str, Any] | None = None  # $ne
    none_of: frozenset | None = None  # $nin
    ranges: list[tuple[str, float]] = field(default_factory=list)


def _scalar(value: Any, param: str) -> tuple[str, Any]:
    tagged = _tag(value)
    if tagged is None:
        kind = {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
        raise FilterError(f"{param}: cannot compare {kind} for equality; use a string, number, boolean or null", param)
    return tagged


def parse_filter(raw: Any, param: str = "filter") -> list[FieldCondition]:
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        raise FilterError(f"{param} must be a JSON object of field conditions", param)
    conditions = []
    for name, spec in raw.items():
        p = f"{param}.{name}"
        if not isinstance(name, str) or not name or name.startswith("$"):
            raise FilterError(f"{p}: field names must be non-empty and must not start with '$' "
                              f"(operators go inside a field: {{\"field\": {{\"$in\": [...]}}}})", param)
        cond = FieldCondition(field=name)
        if not isinstance(spec, Mapping):
            cond.eq = _scalar(spec, p)
            conditions.append(cond)
            continue
        if not spec:
            raise FilterError(f"{p}: empty condition; use one of {list(OPERATORS)}", p)
        for op, value in spec.items():
            q = f"{p}.{op}"
            if op == "$eq":
                cond.eq = _scalar(value, q)
            elif op == "$ne":
                cond.not_eq = _scalar(value, q)
            elif op in ("$in", "$nin"):
                if not isinstance(value, list) or len(value) > MAX_IN_VALUES:
                    raise FilterError(f"{q} must be a list of at most {MAX_IN_VALUES} values", q)
                values = frozenset(_scalar(v, f"{q}[{i}]") for i, v in enumerate(value))
                if op == "$in":
                    cond.one_of = values
                else:
                    cond.none_of = values
            elif op in RANGE_OPS:
                if not _is_number(value):
                    raise FilterError(f"{q}: range operators compare numbers only, got {type(value).__name__}", q)
                cond.ranges.append((op, float(value)))
            else:
                raise FilterError(f"{q}: unknown operator; known: {list(OPERATORS)}", q)
        conditions.append(cond)
    return conditions


def _values_of(metadata: Mapping[str, Any] | None, name: str) -> list[Any] | None:
    """The comparable values of one field: [] when absent, the elements of a list, else [value]."""
    if not metadata or name not in metadata:
        return []
    value = metadata[name]
    return list(value) if isinstance(value, list) else [value]


def _matches_rest(cond: FieldCondition, metadata: Mapping[str, Any] | None) -> bool:
    """The operators that are not answered by postings: $ne, $nin, ranges."""
    values = _values_of(metadata, cond.field)
    tags = {_tag(v) for v in values}
    if cond.not_eq is not None and cond.not_eq in tags:
        return False
    if cond.none_of is not None and tags & cond.none_of:
        return False
    if cond.ranges:
        numbers = [float(v) for v in values if _is_number(v)]
        if not any(all(RANGE_OPS[op](x, bound) for op, bound in cond.ranges) for x in numbers):
            return False
    return True


class MetadataIndex:
    def __init__(self) -> None:
        self._postings: dict[str, dict[tuple[str, Any], set[int]]] = {}

    def _pairs(self, metadata: Mapping[str, Any] | None) -> Iterable[tuple[str, tuple[str, Any]]]:
        if not metadata:
            return
        for name, value in metadata.items():
            for v in value if isinstance(value, list) else (value,):
                tagged = _tag(v)
                if tagged is not None:
                    yield name, tagged

    def add(self, key: int, metadata: Mapping[str, Any] | None) -> None:
        for name, tagged in self._pairs(metadata):
            self._postings.setdefault(name, {}).setdefault(tagged, set()).add(key)

    def remove(self, key: int, metadata: Mapping[str, Any] | None) -> None:
        for name, tagged in self._pairs(metadata):
            by_value = self._postings.get(name)
            keys = by_value.get(tagged) if by_value else None
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del by_value[tagged]

    def matching_keys(self, conditions: list[FieldCondition], all_keys: Iterable[int],
                      metadata_of: Callable[[int], Mapping[str, Any] | None]) -> set[int]:
        """Keys whose metadata satisfies every condition (`metadata_of(key)` decodes one item's metadata).

        Read only: a single equality answers with its posting set itself (no copy of 100k keys per query).
        """
        candidates: set[int] | None = None
        for cond in conditions:
            by_value = self._postings.get(cond.field, {})
            for wanted in [w for w in (cond.eq, cond.one_of) if w is not None]:
                if isinstance(wanted, frozenset):
                    hits = set().union(*(by_value.get(v, ()) for v in wanted)) if wanted else set()
                else:
                    hits = by_value.get(wanted, set())
                candidates = hits if candidates is None else candidates & hits
        rest = [c for c in conditions if c.not_eq is not None or c.none_of is not None or c.ranges]
        if not rest:
            return candidates if candidates is not None else set(all_keys)
        pool = candidates if candidates is not None else all_keys
        return {k for k in pool if all(_matches_rest(c, metadata_of(k)) for c in rest)}
