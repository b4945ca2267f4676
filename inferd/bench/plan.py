"""`inferd plan`: which deployment meets a latency SLO for a demand at the lowest cost, from measurements.

A deployment is one `inferd bench serve` result file: a machine, a model, a quantization choice. `plan` either
reads such files (`--from-results`, e.g. one recorded on a GPU box, one on this laptop) or makes them: it starts
`inferd serve` once per `--quantization` choice (or uses `--base-url`) and sweeps rising concurrency with the
bench tool's own load generator. Then, per deployment:

- a point (one concurrency level) meets the SLO when every stated statistic (`p90_ttft<=1s`, ...) of that point
  is within its bound;
- its sustainable rate is its goodput: requests per second that met every per-request threshold of the SLO
  (bench's `goodput`, recorded with the same thresholds), not its raw throughput; the deployment's rate is the
  highest goodput of the points that meet the SLO. A file recorded without those thresholds falls back to the
  point's throughput, marked in the table;
- cost per 1M tokens = USD per hour / (rate * tokens per request * 3600) * 1e6, tokens = input + output of the
  workload it was measured on;
- replicas = ceil(demand * peak factor / rate); monthly cost always on = replicas * USD/h * 730 h; with
  scale-to-zero the replicas run only the busy hours of each day (cold starts are not measured here).
Hosted APIs are priced per token from the command line (`--api NAME=IN/OUT`) or from a dated file of published
list prices (inferd/bench/data/api_prices.json); their latency is not measured, so they are compared, never
recommended as meeting the SLO.

Layer 6, like the rest of inferd.bench: HTTP and subprocesses only, never the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.bench.metrics import SLO_NAMES

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12
DAYS_PER_MONTH = HOURS_PER_MONTH / 24.0
DEFAULT_API_PRICES_PATH = Path(__file__).parent / "data" / "api_prices.json"
SLO_STATS = {"mean": "mean", "median": "median", "p50": "median", "p90": "p90", "p99": "p99"}
SLO_METRICS = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2el": "e2el", "e2e": "e2el"}
_SLO_TERM_RE = re.compile(r"^\s*([a-z0-9]+)_([a-z0-9]+)\s*<=\s*([0-9]*\.?[0-9]+)\s*(ms|s)\s*$", re.IGNORECASE)
DEFAULT_CONCURRENCIES = "1,2,4,8,16"
SERVER_STARTUP_TIMEOUT_S = 900.0


class PlanInputError(ValueError):
    """A bad flag value; the message starts with the flag's name. `inferd plan` exits 2 on it."""


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class SloTerm:
    stat: str  # mean | median | p90 | p99 (the key prefix in a bench point)
    metric: str  # ttft | tpot | itl | e2el
    limit_ms: float

    @property
    def point_key(self) -> str:
        return f"{self.stat}_{self.metric}_ms"

    def __str__(self) -> str:
        return f"{self.stat}_{self.metric}<={self.limit_ms:g}ms"


def parse_slo(text: str) -> list[SloTerm]:
    """"p90_ttft<=1s,p90_tpot<=100ms" -> terms; stats mean/median/p50/p90/p99, metrics ttft/tpot/itl/e2el."""
    terms = []
    for item in text.split(","):
        if not item.strip():
            continue
        match = _SLO_TERM_RE.match(item)
        if match is None:
            raise PlanInputError(f"--slo: {item.strip()!r} is not STAT_METRIC<=VALUE(ms|s), e.g. p90_ttft<=1s")
        stat, metric, value, unit = match.groups()
        if stat.lower() not in SLO_STATS:
            raise PlanInputError(f"--slo: {item.strip()!r}: statistic must be one of {', '.join(SLO_STATS)}")
        if metric.lower() not in SLO_METRICS:
            raise PlanInputError(f"--slo: {item.strip()!r}: metric must be one of {', '.join(SLO_METRICS)}")
        limit_ms = float(value) * (1000.0 if unit.lower() == "s" else 1.0)
        if limit_ms <= 0:
            raise PlanInputError(f"--slo: {item.strip()!r}: the bound must be > 0")
        terms.append(SloTerm(SLO_STATS[stat.lower()], SLO_METRICS[metric.lower()], limit_ms))
    if not terms:
        raise PlanInputError("--slo: give at least one term, e.g. p90_ttft<=1s,p90_tpot<=100ms")
    return terms


def goodput_thresholds_ms(terms: Sequence[SloTerm]) -> dict[str, float]:
    """Per-request thresholds for goodput: for each metric bench can count per request (ttft, tpot, e2el), the
    loosest bound the SLO puts on it (a p90 bound of 1 s means a request slower than 1 s counts against it)."""
    thresholds: dict[str, float] = {}
    for term in terms:
        if term.metric in SLO_NAMES:
            thresholds[term.metric] = max(thresholds.get(term.metric, 0.0), term.limit_ms)
    return thresholds


def _positive_number(text: str, flag: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PlanInputError(f"{flag}: {what} {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise PlanInputError(f"{flag}: {what} must be a finite number >= 0, got {text!r}")
    return value


def parse_prices_per_hour(specs: Sequence[str] | None) -> dict[str | None, float]:
    """["cpu=0.10", "gpu=2.5"] -> {"cpu": 0.1, "gpu": 2.5}; a bare "0.10" prices every deployment (key None)."""
    prices: dict[str | None, float] = {}
    for spec in specs or ():
        name, sep, value = spec.rpartition("=")
        key = name.strip() if sep else None
        if sep and not key:
            raise PlanInputError(f"--price-per-hour: {spec!r} has an empty deployment name (NAME=USD)")
        if key in prices:
            raise PlanInputError(f"--price-per-hour: {key or 'the bare price'} is given twice")
        prices[key] = _positive_number(value.strip().lstrip("$"), "--price-per-hour", "price")
    return prices


@dataclass(frozen=True)
class ApiPrice:
    name: str
    usd_per_1m_input_tokens: float
    usd_per_1m_output_tokens: float
    as_of: str | None = None
    source: str | None = None

    def usd_per_request(self, num_input_tokens: float, num_output_tokens: float) -> float:
        return (num_input_tokens * self.usd_per_1m_input_tokens
                + num_output_tokens * self.usd_per_1m_output_tokens) / 1e6


def load_api_price_table(path: str | Path) -> dict[str, ApiPrice]:
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        table = {}
        for entry in document["prices"]:
            table[entry["name"]] = ApiPrice(entry["name"], float(entry["usd_per_1m_input_tokens"]),
                                            float(entry["usd_per_1m_output_tokens"]), entry.get("as_of"),
                                            entry.get("source"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanInputError(f"--api-prices-file: cannot read {path}: {exc}") from None
    return table


def parse_api_prices(specs: Sequence[str] | None, table_path: str | Path = DEFAULT_API_PRICES_PATH) -> list[ApiPrice]:
    """Each spec: NAME=IN/OUT (USD per 1M input/output tokens), NAME (a row of the price file), or `all`."""
    prices: list[ApiPrice] = []
    table: dict[str, ApiPrice] | None = None
    for spec in specs or ():
        name, sep, value = spec.partition("=")
        name = name.strip()
        if sep:
            tokens_in, slash, tokens_out = value.partition("/")
            if not slash or not name:
                raise PlanInputError(f"--api: {spec!r} is not NAME=IN/OUT (USD per 1M input/output tokens)")
            prices.append(ApiPrice(name, _positive_number(tokens_in.strip().lstrip("$"), "--api", "input price"),
                                   _positive_number(tokens_out.strip().lstrip("$"), "--api", "output price")))
            continue
        if table is None:
            table = load_api_price_table(table_path)
        if name == "all":
            prices.extend(table.values())
        elif name in table:
            prices.append(table[name])
        else:
            raise PlanInputError(f"--api: {name!r} is not in {table_path}; known: {', '.join(table)} "
                                 "(or give NAME=IN/OUT)")
    return prices


@dataclass(frozen=True)
class Demand:
    requests_per_s: float  # mean rate during the busy hours
    peak_factor: float  # the peak the replicas are sized for = requests_per_s * peak_factor
    busy_hours_per_day: float

    @property
    def peak_requests_per_s(self) -> float:
        return self.requests_per_s * self.peak_factor

    @property
    def requests_per_month(self) -> float:
        return self.requests_per_s * 3600.0 * self.busy_hours_per_day * DAYS_PER_MONTH


def make_demand(requests_per_s: float, peak_factor: float, busy_hours_per_day: float) -> Demand:
    if not requests_per_s > 0 or not math.isfinite(requests_per_s):
        raise PlanInputError(f"--demand: requests per second must be > 0, got {requests_per_s}")
    if not peak_factor >= 1 or not math.isfinite(peak_factor):
        raise PlanInputError(f"--peak-factor: must be >= 1, got {peak_factor}")
    if not 0 < busy_hours_per_day <= 24:
        raise PlanInputError(f"--busy-hours-per-day: must be in (0, 24], got {busy_hours_per_day}")
    return Demand(requests_per_s, peak_factor, busy_hours_per_day)


# ------------------------------------------------------------------------------------------------ arithmetic
@dataclass
class PointVerdict:
    point: dict[str, Any]
    misses: list[str]  # SLO terms this point misses, as text; empty = meets the SLO
    rate_per_s: float  # goodput (or throughput when `is_goodput` is False)
    is_goodput: bool

    @property
    def meets_slo(self) -> bool:
        return not self.misses

    @property
    def tokens_per_request(self) -> float:
        return (self.point.get("mean_input_tokens") or 0.0) + (self.point.get("mean_output_tokens") or 0.0)


@dataclass
class DeploymentPlan:
    name: str
    source: str  # the result file
    verdicts: list[PointVerdict]
    usd_per_hour: float | None
    best: PointVerdict | None = None
    cost_per_1m_tokens_usd: float | None = None
    num_replicas: int | None = None
    monthly_usd_always_on: float | None = None
    monthly_usd_scale_to_zero: float | None = None
    notes: list[str] = field(default_factory=list)


def judge_point(point: dict[str, Any], terms: Sequence[SloTerm]) -> PointVerdict:
    misses = []
    for term in terms:
        value_ms = point.get(term.point_key)
        if value_ms is None:
            misses.append(f"{term.point_key} not recorded")
        elif value_ms > term.limit_ms:
            misses.append(f"{term.stat}_{term.metric} {value_ms:.0f}ms > {term.limit_ms:g}ms")
    thresholds = goodput_thresholds_ms(terms)
    recorded = {k: float(v) for k, v in (point.get("goodput_slos_ms") or {}).items()}
    if point.get("goodput") is not None and recorded == thresholds:
        return PointVerdict(point, misses, float(point["goodput"]), True)
    return PointVerdict(point, misses, float(point.get("request_throughput") or 0.0), False)


def plan_deployment(name: str, source: str, result: dict[str, Any], terms: Sequence[SloTerm],
                    usd_per_hour: float | None, demand: Demand) -> DeploymentPlan:
    verdicts = [judge_point(point, terms) for point in result["points"] if point.get("completed")]
    plan = DeploymentPlan(name, source, verdicts, usd_per_hour)
    passing = [v for v in verdicts if v.meets_slo and v.rate_per_s > 0]
    if not passing:
        return plan
    plan.best = best = max(passing, key=lambda v: v.rate_per_s)
    if not best.is_goodput:
        plan.notes.append("rate is throughput: the file's goodput was not recorded with this SLO's thresholds "
                          f"({_thresholds_text(goodput_thresholds_ms(terms))})")
    plan.num_replicas = math.ceil(demand.peak_requests_per_s / best.rate_per_s)
    if usd_per_hour is not None:
        tokens_per_hour = best.rate_per_s * best.tokens_per_request * 3600.0
        if tokens_per_hour > 0:
            plan.cost_per_1m_tokens_usd = usd_per_hour / tokens_per_hour * 1e6
        plan.monthly_usd_always_on = plan.num_replicas * usd_per_hour * HOURS_PER_MONTH
        plan.monthly_usd_scale_to_zero = plan.num_replicas * usd_per_hour * demand.busy_hours_per_day * DAYS_PER_MONTH
    return plan


def _thresholds_text(thresholds: dict[str, float]) -> str:
    return " ".join(f"{name}:{value:g}" for name, value in thresholds.items()) or "none"


@dataclass
class ApiPlan:
    price: ApiPrice
    cost_per_1m_tokens_usd: float  # at this workload's input/output mix
    monthly_usd: float


def plan_api(price: ApiPrice, mean_input_tokens: float, mean_output_tokens: float, demand: Demand) -> ApiPlan:
    usd_per_request = price.usd_per_request(mean_input_tokens, mean_output_tokens)
    tokens_per_request = mean_input_tokens + mean_output_tokens
    return ApiPlan(price, usd_per_request / tokens_per_request * 1e6, usd_per_request * demand.requests_per_month)


@dataclass
class Plan:
    slo: list[SloTerm]
    demand: Demand
    deployments: list[DeploymentPlan]
    apis: list[ApiPlan]
    mean_input_tokens: float
    mean_output_tokens: float
    recommendation: str
    recommended: str | None  # a deployment's name, or None when nothing that meets the SLO has a price
    warnings: list[str]


def workload_tokens(results: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Mean input and output tokens per request over every completed request of every file."""
    num, num_in, num_out = 0, 0.0, 0.0
    for result in results:
        for point in result["points"]:
            if point.get("completed"):
                num += point["completed"]
                num_in += point.get("total_input_tokens") or 0
                num_out += point.get("total_output_tokens") or 0
    if num == 0:
        raise ValueError("no completed requests in any result file")
    return num_in / num, num_out / num


def make_plan(deployments: Sequence[tuple[str, str, dict[str, Any]]], terms: Sequence[SloTerm],
              prices_per_hour: dict[str | None, float], apis: Sequence[ApiPrice], demand: Demand) -> Plan:
    """`deployments`: (name, source file, bench result) each."""
    names = [name for name, _, _ in deployments]
    unknown = [name for name in prices_per_hour if name is not None and name not in names]
    if unknown:
        raise PlanInputError(f"--price-per-hour: no deployment named {', '.join(map(repr, unknown))}; "
                             f"deployments: {', '.join(names)}")
    plans = [plan_deployment(name, source, result, terms, prices_per_hour.get(name, prices_per_hour.get(None)),
                             demand) for name, source, result in deployments]
    mean_in, mean_out = workload_tokens([result for _, _, result in deployments])
    warnings = []
    per_file = [workload_tokens([result]) for _, _, result in deployments]
    for (name, _, _), (file_in, file_out) in zip(deployments, per_file):
        if abs(file_in + file_out - mean_in - mean_out) > 0.1 * (mean_in + mean_out):
            warnings.append(f"{name} was measured on another workload ({file_in:.0f} in + {file_out:.0f} out tokens "
                            f"per request, against {mean_in:.0f} + {mean_out:.0f} over all files)")
    api_plans = [plan_api(price, mean_in, mean_out, demand) for price in apis]
    recommendation, recommended = recommend(plans, api_plans, terms)
    return Plan(list(terms), demand, plans, api_plans, mean_in, mean_out, recommendation, recommended, warnings)


def recommend(plans: Sequence[DeploymentPlan], api_plans: Sequence[ApiPlan],
              terms: Sequence[SloTerm]) -> tuple[str, str | None]:
    slo_text = ",".join(map(str, terms))
    meeting = [p for p in plans if p.best is not None]
    priced = [p for p in meeting if p.monthly_usd_always_on is not None]
    lines = []
    recommended = None
    if not meeting:
        lines.append(f"nothing meets the SLO {slo_text}: no deployment has a measured point within it")
        for plan in plans:
            if plan.verdicts:
                closest = min(plan.verdicts, key=lambda v: len(v.misses))
                lines.append(f"  {plan.name}: closest point {_point_name(closest.point)} misses "
                             f"{'; '.join(closest.misses)}")
    elif not priced:
        lines.append(f"meets the SLO {slo_text}: {', '.join(p.name for p in meeting)}; no --price-per-hour for "
                     "them, so none is priced")
    else:
        cheapest = min(priced, key=lambda p: p.monthly_usd_always_on or 0.0)
        recommended = cheapest.name
        assert cheapest.best is not None and cheapest.monthly_usd_always_on is not None
        lines.append(
            f"recommended: {cheapest.name} ({_point_name(cheapest.best.point)}), the cheapest that meets the SLO "
            f"{slo_text}: {cheapest.num_replicas} replica(s), ${cheapest.monthly_usd_always_on:,.2f}/month always "
            f"on, ${cheapest.monthly_usd_scale_to_zero:,.2f}/month with scale-to-zero, "
            f"${cheapest.cost_per_1m_tokens_usd:.4f} per 1M tokens at full load")
    if api_plans:
        api = min(api_plans, key=lambda a: a.monthly_usd)
        compare = ""
        if recommended is not None:
            own = next(p for p in plans if p.name == recommended).monthly_usd_always_on or 0.0
            compare = " (cheaper than the recommendation)" if api.monthly_usd < own else " (dearer)"
        lines.append(f"cheapest hosted API given: {api.price.name} at ${api.monthly_usd:,.2f}/month{compare}, "
                     f"${api.cost_per_1m_tokens_usd:.4f} per 1M tokens of this mix; its latency is not measured here")
    return "\n".join(lines), recommended


def _point_name(point: dict[str, Any]) -> str:
    if point.get("max_concurrency") is not None:
        return f"concurrency {point['max_concurrency']}"
    return f"rate {point.get('request_rate')}"


# ------------------------------------------------------------------------------------------------ output
def _money(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"${value:,.{digits}f}"


def format_plan(plan: Plan) -> str:
    demand = plan.demand
    header = (f"SLO {','.join(map(str, plan.slo))}; demand {demand.requests_per_s:g} req/s x peak "
              f"{demand.peak_factor:g} = {demand.peak_requests_per_s:g} req/s over {demand.busy_hours_per_day:g} "
              f"busy h/day; workload {plan.mean_input_tokens:.0f} in + {plan.mean_output_tokens:.0f} out tokens/request")
    columns = ("deployment", "best point", "rate req/s", "p90 TTFT ms", "p90 TPOT ms", "USD/h", "USD/1M tok",
               "replicas", "USD/month", "scale-to-0", "SLO")
    rows = []
    for p in plan.deployments:
        best = p.best
        shown = best or (min(p.verdicts, key=lambda v: len(v.misses)) if p.verdicts else None)
        rate = "-" if best is None else f"{best.rate_per_s:.3g}" + ("" if best.is_goodput else "*")
        rows.append((
            p.name, "-" if best is None else _point_name(best.point).replace("concurrency ", "c="), rate,
            "-" if shown is None or shown.point.get("p90_ttft_ms") is None else f"{shown.point['p90_ttft_ms']:.0f}",
            "-" if shown is None or shown.point.get("p90_tpot_ms") is None else f"{shown.point['p90_tpot_ms']:.1f}",
            _money(p.usd_per_hour), _money(p.cost_per_1m_tokens_usd, 4),
            "-" if p.num_replicas is None else str(p.num_replicas),
            _money(p.monthly_usd_always_on), _money(p.monthly_usd_scale_to_zero),
            "meets" if best is not None else "misses",
        ))
    for a in plan.apis:
        rows.append((f"api:{a.price.name}", "-", "-", "n/m", "n/m", "-", _money(a.cost_per_1m_tokens_usd, 4), "-",
                     _money(a.monthly_usd), _money(a.monthly_usd), "not measured"))
    widths = [max(len(columns[i]), *(len(row[i]) for row in rows)) if rows else len(columns[i])
              for i in range(len(columns))]
    lines = [header, "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    if any(p.best is not None and not p.best.is_goodput for p in plan.deployments):
        lines.append("* throughput, not goodput: that file was recorded without this SLO's thresholds")
    if plan.apis:
        lines.append("n/m: not measured. API USD/month = per-token price x this workload x the demand.")
    for p in plan.deployments:
        if p.best is not None and p.usd_per_hour is None:
            lines.append(f"{p.name}: no --price-per-hour, not priced")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines.append(plan.recommendation)
    return "\n".join(lines)


def plan_to_json(plan: Plan) -> dict[str, Any]:
    return {
        "slo": [str(t) for t in plan.slo],
        "demand": {"requests_per_s": plan.demand.requests_per_s, "peak_factor": plan.demand.peak_factor,
                   "busy_hours_per_day": plan.demand.busy_hours_per_day},
        "mean_input_tokens": plan.mean_input_tokens,
        "mean_output_tokens": plan.mean_output_tokens,
        "deployments": [{
            "name": p.name, "source": p.source, "usd_per_hour": p.usd_per_hour,
            "meets_slo": p.best is not None,
            "rate_per_s": None if p.best is None else p.best.rate_per_s,
            "is_goodput": None if p.best is None else p.best.is_goodput,
            "best_point": None if p.best is None else _point_name(p.best.point),
            "cost_per_1m_tokens_usd": p.cost_per_1m_tokens_usd, "num_replicas": p.num_replicas,
            "monthly_usd_always_on": p.monthly_usd_always_on, "monthly_usd_scale_to_zero": p.monthly_usd_scale_to_zero,
            "points": [{"point": _point_name(v.point), "rate_per_s": v.rate_per_s, "misses": v.misses}
                       for v in p.verdicts],
        } for p in plan.deployments],
        "apis": [{"name": a.price.name, "usd_per_1m_input_tokens": a.price.usd_per_1m_input_tokens,
                  "usd_per_1m_output_tokens": a.price.usd_per_1m_output_tokens, "as_of": a.price.as_of,
                  "source": a.price.source, "cost_per_1m_tokens_usd": a.cost_per_1m_tokens_usd,
                  "monthly_usd": a.monthly_usd} for a in plan.apis],
        "recommended": plan.recommended,
        "recommendation": plan.recommendation,
    }


def plot_plan(plan: Plan, out_path: str | Path) -> None:
    """Cost per 1M tokens (y, log) against TTFT and TPOT (x: the statistic the SLO bounds, else p90): one marker per measured point of each priced
    deployment (hollow where the point misses the SLO), the SLO's bounds on these metrics as vertical lines, APIs as
    horizontal lines (their latency is unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        # The x axis shows the statistic the SLO bounds for this metric (p90 when it bounds none).
        stat = next((term.stat for term in plan.slo if term.metric == metric), "p90")
        for p in plan.deployments:
            if p.usd_per_hour is None:
                continue
            plotted = []  # (p90 ms, USD per 1M tokens at the point's rate, verdict)
            for v in p.verdicts:
                tokens_per_hour = v.rate_per_s * v.tokens_per_request * 3600.0
                if v.point.get(f"{stat}_{metric}_ms") is not None and tokens_per_hour > 0:
                    plotted.append((v.point[f"{stat}_{metric}_ms"], p.usd_per_hour / tokens_per_hour * 1e6, v))
            (line,) = ax.plot([x for x, _, _ in plotted], [y for _, y, _ in plotted], marker="o", label=p.name)
            misses = [(x, y) for x, y, v in plotted if not v.meets_slo]
            if misses:  # hollow: the point misses the SLO
                ax.plot([x for x, _ in misses], [y for _, y in misses], linestyle="none", marker="o",
                        markerfacecolor="white", markeredgecolor=line.get_color())
            for x, y, v in plotted:
                ax.annotate(_point_name(v.point).replace("concurrency ", "c="), (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=line.get_color())
        for index, a in enumerate(plan.apis):
            ax.axhline(a.cost_per_1m_tokens_usd, linestyle=":", linewidth=1.2, label=f"api:{a.price.name}",
                       color=f"C{(len(plan.deployments) + index) % 10}")
        for term in plan.slo:
            if term.metric == metric and term.stat == stat:
                ax.axvline(term.limit_ms, color="red", linestyle="--", linewidth=1.2, label=f"SLO {term}")
        ax.set_xlabel(f"{stat} {metric.upper()} (ms)")
        ax.set_ylabel("USD per 1M tokens (input + output)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"inferd plan: cost vs latency  (rate = goodput per point; recommended: {plan.recommended or '-'})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ measuring
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`inferd serve` in a subprocess on 127.0.0.1 (one per quantization choice); the log goes to a temp file."""

    def __init__(self, model: str, quantization: str, serve_args: Sequence[str], startup_timeout_s: float) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="inferd-plan-serve-", suffix=".log", delete=False)
        # The response cache off: bench repeats its dataset, and a cached answer would measure the cache, not the engine.
        command = [sys.executable, "-m", "inferd.cli", "serve", "--model", model, "--quantization", quantization,
                   "--host", "127.0.0.1", "--port", str(self.port), "--response-cache-bytes", "0", *serve_args]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_healthy(startup_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"inferd serve exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"inferd serve not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")
                time.sleep(0.25)

    def log_tail(self, num_chars: int = 3000) -> str:
        return Path(self._log.name).read_text(errors="replace")[-num_chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        os.unlink(self._log.name)


def bench_argv(args: argparse.Namespace, base_url: str, model: str | None, label: str, result_path: Path,
               terms: Sequence[SloTerm]) -> list[str]:
    """The `inferd bench serve` command line one measurement runs (its result file is one deployment)."""
    argv = ["--base-url", base_url, "--label", label, "--dataset", args.dataset, "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--range-ratio", str(args.range_ratio),
            "--num-prompts", str(args.num_prompts), "--seed", str(args.seed), "--max-concurrency", args.concurrency,
            "--result-json", str(result_path), "--disable-tqdm"]
    if model:
        argv += ["--model", model]
    if args.endpoint:
        argv += ["--endpoint", args.endpoint]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    thresholds = goodput_thresholds_ms(terms)
    if thresholds:
        argv += ["--goodput", *(f"{name}:{value:g}" for name, value in thresholds.items())]
    return argv


def run_bench(argv: list[str]) -> dict[str, Any]:
    from inferd.bench.serve import add_serve_arguments, run_serve_async

    parser = argparse.ArgumentParser(prog="inferd bench serve")
    add_serve_arguments(parser)
    bench_args = parser.parse_args(argv)
    bench_args.api_key = bench_args.api_key or os.environ.get("OPENAI_API_KEY")
    result = asyncio.run(run_serve_async(bench_args))
    with open(bench_args.result_json, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
    print(f"wrote {bench_args.result_json}", file=sys.stderr)
    return result


def measure(args: argparse.Namespace, terms: Sequence[SloTerm]) -> list[tuple[str, str, dict[str, Any]]]:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deployments = []
    if args.base_url:
        name = args.label or "local"
        path = out_dir / f"plan-{name}.json"
        result = run_bench(bench_argv(args, args.base_url, args.model, name, path, terms))
        return [(name, str(path), result)]
    serve_args = shlex.split(args.serve_args or "")
    for quantization in args.quantization:
        name = quantization
        print(f"plan: starting inferd serve --model {args.model} --quantization {quantization}", file=sys.stderr)
        server = ServeProcess(args.model, quantization, serve_args, args.startup_timeout_s)
        try:
            path = out_dir / f"plan-{name}.json"
            result = run_bench(bench_argv(args, server.base_url, None, name, path, terms))
        finally:
            server.stop()
        deployments.append((name, str(path), result))
    return deployments


# ------------------------------------------------------------------------------------------------ command
def deployment_names(paths: Sequence[str], results: Sequence[dict[str, Any]]) -> list[str]:
    """A file's deployment name is its bench --label, else its file name without .json; labels used twice fall
    back to file names."""
    labels = [r.get("config", {}).get("label") or Path(p).stem for p, r in zip(paths, results)]
    names = [label if labels.count(label) == 1 else Path(p).stem for label, p in zip(labels, paths)]
    if len(set(names)) != len(names):
        raise PlanInputError(f"--from-results: two files share a name ({', '.join(names)}); rename one")
    return names


def load_results(paths: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    from inferd.bench.plot import load_result

    results = []
    for path in paths:
        try:
            results.append(load_result(path))
        except (OSError, ValueError) as exc:
            raise PlanInputError(f"--from-results: {exc}") from None
    return list(zip(deployment_names(paths, results), paths, results))


def run_plan_command(args: argparse.Namespace) -> int:
    try:
        # Every input is checked before anything is measured (a measurement takes minutes).
        terms = parse_slo(args.slo)
        prices_per_hour = parse_prices_per_hour(args.price_per_hour)
        apis = parse_api_prices(args.api, args.api_prices_file)
        demand = make_demand(args.demand, args.peak_factor, args.busy_hours_per_day)
        if bool(args.from_results) == bool(args.model or args.base_url):
            raise PlanInputError("--from-results: give either result files or --model / --base-url to measure")
        if args.model and args.base_url:
            raise PlanInputError("--base-url: measures a running server; do not give --model with it")
        if args.from_results:
            deployments = load_results(args.from_results)
        else:
            args.quantization = [q.strip() for q in (args.quantization or "auto").split(",") if q.strip()]
            expected = [args.label or "local"] if args.base_url else args.quantization
            unknown = [n for n in prices_per_hour if n is not None and n not in expected]
            if unknown:
                raise PlanInputError(f"--price-per-hour: no deployment named {', '.join(map(repr, unknown))}; "
                                     f"deployments: {', '.join(expected)}")
            from inferd.bench import datasets
            from inferd.bench.serve import parse_concurrencies

            parse_concurrencies(args.concurrency)
            if args.dataset not in datasets.DATASET_NAMES and not os.path.isfile(args.dataset):
                raise PlanInputError(f"--dataset: {args.dataset!r} is neither "
                                     f"{' nor '.join(datasets.DATASET_NAMES)} nor a file")
        if args.plot:
            from inferd.bench.plot import require_matplotlib

            require_matplotlib()
    except PlanInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except argparse.ArgumentTypeError as exc:
        print(f"error: --concurrency: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # require_matplotlib's message names the extra
        print(f"error: --plot: {exc}", file=sys.stderr)
        return 2

    if not args.from_results:
        try:
            deployments = measure(args, terms)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        plan = make_plan(deployments, terms, prices_per_hour, apis, demand)
    except PlanInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_plan(plan), flush=True)
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as out:
            json.dump(plan_to_json(plan), out, indent=2)
        print(f"wrote {args.result_json}", file=sys.stderr)
    if args.plot:
        plot_plan(plan, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `plan` on a CLI's subparsers; it sets `func(args) -> exit code`."""
    p = subparsers.add_parser(
        "plan", help="cheapest deployment that meets a latency SLO for a demand (measured or from bench files)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Measure deployments (or read `inferd bench serve` result files), find each one's highest "
                    "goodput within the SLO, price it, and recommend the cheapest.",
    )
    source = p.add_argument_group("deployments")
    source.add_argument("--from-results", nargs="+", default=None, metavar="FILE",
                        help="bench serve result files, one deployment each (named by their --label or file name)")
    source.add_argument("--model", default=None, help="measure: start `inferd serve --model M` per --quantization")
    source.add_argument("--quantization", default=None,
                        help="measure: comma list of quantization choices, each a deployment (default: auto)")
    source.add_argument("--serve-args", default=None, help='measure: extra `inferd serve` flags, e.g. "--max-model-len 2048"')
    source.add_argument("--base-url", default=None, help="measure a server already running (one deployment)")
    source.add_argument("--label", default=None, help="with --base-url: the deployment's name (default: local)")
    source.add_argument("--api-key", default=None, help="with --base-url: bearer token (default: $OPENAI_API_KEY)")
    source.add_argument("--startup-timeout-s", type=float, default=SERVER_STARTUP_TIMEOUT_S)
    source.add_argument("--out-dir", default="plan-results", help="measure: where the bench result files go")

    workload = p.add_argument_group("workload (when measuring)")
    workload.add_argument("--dataset", default="random", help="random | prefix-repetition | a .jsonl of real requests")
    workload.add_argument("--endpoint", choices=("completions", "chat"), default=None)
    workload.add_argument("--input-len", type=int, default=256)
    workload.add_argument("--output-len", type=int, default=128)
    workload.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1-R)..len*(1+R)")
    workload.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level")
    workload.add_argument("--concurrency", default=DEFAULT_CONCURRENCIES, help="rising concurrency levels")
    workload.add_argument("--seed", type=int, default=0)

    target = p.add_argument_group("demand, SLO and prices")
    target.add_argument("--slo", required=True, help="e.g. p90_ttft<=1s,p90_tpot<=100ms (stats mean, median, p90, "
                                                     "p99; metrics ttft, tpot, itl, e2el)")
    target.add_argument("--demand", type=float, required=True, help="requests/s during the busy hours")
    target.add_argument("--peak-factor", type=float, default=1.0, help="replicas are sized for demand x this")
    target.add_argument("--busy-hours-per-day", type=float, default=24.0,
                        help="hours a day the demand lasts; scale-to-zero runs replicas only then")
    target.add_argument("--price-per-hour", action="append", default=None, metavar="[NAME=]USD",
                        help="a deployment's price per hour (repeatable); a bare USD prices every deployment")
    target.add_argument("--api", action="append", default=None, metavar="NAME[=IN/OUT]",
                        help="a hosted API to compare: NAME=IN/OUT USD per 1M input/output tokens, a NAME from "
                             "--api-prices-file, or `all` (repeatable)")
    target.add_argument("--api-prices-file", default=str(DEFAULT_API_PRICES_PATH),
                        help="dated list prices (name, USD per 1M input/output tokens, as_of, source URL)")

    report = p.add_argument_group("report")
    report.add_argument("--plot", default=None, help="PNG: cost per 1M tokens vs p90 latency (needs matplotlib)")
    report.add_argument("--result-json", default=None, help="write the plan as JSON")
    p.set_defaults(func=run_plan_command)
    return p
