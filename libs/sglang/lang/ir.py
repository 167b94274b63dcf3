"""The frontend language's expressions: what ``s += ...`` appends to a program state.

``"text" + sgl.gen("x")`` builds an :class:`ExprList`; the executor runs the pieces in order. Sampling
options of one ``gen`` live in :class:`GenParams`, whose unset fields (None) take the defaults given
to ``func.run(...)`` and then SGLang's defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128, "stop": None, "stop_token_ids": None, "temperature": 1.0, "top_p": 1.0,
    "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False,
}
"""SGLang's sampling defaults for the fields a program may leave unset."""

INT_REGEX = r"[-+]?[0-9]+"
FLOAT_REGEX = r"[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?"
BOOL_REGEX = r"(True|False)"
STR_REGEX = r"\"[^\"\n]*\""


@dataclass
class GenParams:
    """Sampling options of one ``gen`` (SGLang names; None = unset)."""

    max_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    def resolved(self, defaults: GenParams) -> GenParams:
        """These params, unset fields taken from ``defaults`` and then from :data:`DEFAULTS`."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                v = getattr(defaults, f.name)
            if v is None:
                v = DEFAULTS.get(f.name)
            out[f.name] = v
        return GenParams(**out)

    def to_sampling_params(self) -> dict[str, Any]:
        """The set fields as SGLang's ``sampling_params`` dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def json_schema_string(schema: Any) -> str:
    """``gen(json_schema=...)`` accepts a dict, a JSON string or a pydantic model class."""
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except ValueError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    raise TypeError(f"json_schema must be a dict, a JSON string or a pydantic model class, not {type(schema).__name__}")


def dtype_regex(dtype: Any) -> str:
    """The regex that constrains ``gen(dtype=...)``: int, float, bool or str (a quoted string)."""
    table = {int: INT_REGEX, float: FLOAT_REGEX, bool: BOOL_REGEX, str: STR_REGEX,
             "int": INT_REGEX, "float": FLOAT_REGEX, "bool": BOOL_REGEX, "str": STR_REGEX}
    if dtype not in table:
        raise ValueError(f"dtype must be one of int, float, bool, str; got {dtype!r}")
    return table[dtype]


class Expr:
    """Anything a program appends; ``+`` concatenates."""

    def __add__(self, other: Any) -> ExprList:
        return ExprList([self, to_expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([to_expr(other), self])


@dataclass(eq=False)
class ExprList(Expr):
    exprs: list[Expr] = field(default_factory=list)

    def __add__(self, other: Any) -> ExprList:
        return ExprList([*self.exprs, to_expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([to_expr(other), *self.exprs])


@dataclass(eq=False)
class Text(Expr):
    value: str


@dataclass(eq=False)
class Gen(Expr):
    name: str | None
    params: GenParams


@dataclass(eq=False)
class Select(Expr):
    name: str | None
    choices: list[str]
    temperature: float = 0.0


@dataclass(eq=False)
class Image(Expr):
    data: str | bytes


@dataclass(eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(eq=False)
class Join(Expr):
    """Folds forks back into their parent (see ``ForkGroup.join``)."""

    forks: list[Any]  # StreamExecutor
    mode: str


def to_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(f"cannot append {type(value).__name__} to a program state; append str or sgl expressions")


def flatten(expr: Expr) -> list[Expr]:
    if isinstance(expr, ExprList):
        return [e for x in expr.exprs for e in flatten(x)]
    return [expr]


def variable_names(expr: Expr) -> list[str]:
    """Names of the variables ``expr`` will set (its gens and selects)."""
    return [e.name for e in flatten(expr) if isinstance(e, (Gen, Select)) and e.name is not None]
