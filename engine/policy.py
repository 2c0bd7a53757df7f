"""A policy as typed data: the layers, their parameters and the clause each one cites.

A ``PolicyFile`` (from ``engine.loader``) holds every parameter as a ``Dated`` series; its
``snapshot(day)`` is a ``Policy`` whose parameters are single ``Param`` values in force on that
day. Evaluators only ever see snapshots.
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from datetime import date
from typing import Any, Generic, Mapping, TypeVar

T = TypeVar("T")

# The facts about a claim that a layer or an adjustment can be conditioned on (spec §1, §3, §4).
FACTS = (
    "EMPLOYEE", "RESIDENT", "RETIRED",
    "FIVE_GUARANTEE", "POVERTY_REGISTERED", "MINIMUM_LIVING", "EXTREME_HARDSHIP",
    "LEVEL_1", "LEVEL_2", "LEVEL_3", "NON_DESIGNATED",
    "HOME_BED_AFTER_TRANSFER", "OUT_OF_AREA_UNFILED", "CHILDBIRTH", "MATERNITY_ELIGIBLE",
    "PRIMARY_FACILITY", "OTHER_FACILITY", "REFERRED_BY_PRIMARY", "REFERRAL",
)
FACT_BIT = {name: 1 << i for i, name in enumerate(FACTS)}

LAYER_KINDS = ("deductible_rate", "marginal_bands", "allowance_rate")


@dataclass(frozen=True, slots=True)
class Param(Generic[T]):
    """One parameter value in force, with the clause that sets it and the date it took effect."""

    value: T
    ref: str
    since: date


@dataclass(frozen=True, slots=True)
class Dated(Generic[T]):
    """A parameter's values by effective date (sorted): the newest on or before a day is in force."""

    points: tuple[Param[T], ...]

    def at(self, day: date) -> Param[T] | None:
        i = bisect.bisect_right([p.since for p in self.points], day)
        return self.points[i - 1] if i else None


@dataclass(frozen=True, slots=True)
class Band:
    from_fen: int       # the band starts where the cumulative base passes this amount
    rate_bp: int


@dataclass(frozen=True, slots=True)
class ScaleStep:
    upto_months: int | None   # None: open-ended last step
    scale_bp: int


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A change to a layer's deductible or rate for claims with all the ``when`` facts."""

    when: frozenset[str]
    ref: str
    deductible_fen: Any = None        # set the deductible
    deductible_delta_fen: Any = None  # add to it (may be negative; floored at 0)
    rate_bp: Any = None               # set the rate
    rate_delta_bp: Any = None         # add points (may be negative; floored at 0)
    rate_divisor: Any = None          # integer division of the bp value, e.g. halving


@dataclass(frozen=True, slots=True)
class Floor:
    """A minimum payment of a layer for claims with all the ``when`` facts (maternity)."""

    when: frozenset[str]
    amount_fen: Any


@dataclass(frozen=True, slots=True)
class Row:
    """One group row of a marginal-bands layer: the first row matching the member applies."""

    groups: frozenset[str]    # any of these groups; empty matches everyone
    ref: str
    bands: Any                # tuple[Band, ...]
    threshold_share_bp: Any = None  # of the layer's threshold; None means 100%
    annual_cap_fen: Any = None      # None: no cap
    cap_scaled_by_continuity: bool = False


@dataclass(frozen=True, slots=True)
class Layer:
    id: str
    fund: str
    kind: str
    claim_kind: str
    when: frozenset[str]
    ref: str
    adjustments: tuple[Adjustment, ...] = ()
    # deductible_rate
    deductible_fen: Mapping[str, Any] | None = None  # by facility level
    rate_bp: Any = None               # deductible_rate: by level; allowance_rate: one value
    annual_cap_fen: Any = None
    cap_scaled_by_continuity: bool = False
    referral_chain_ref: str | None = None
    childbirth_floor: Floor | None = None
    # marginal_bands
    threshold_fen: Any = None
    rows: tuple[Row, ...] = ()
    # allowance_rate
    yearly_allowance_fen: Any = None
    monthly_allowance_fen: Any = None


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules of one region in force on one day (a snapshot: every parameter is a Param)."""

    region: str
    effective: date
    version: str
    continuity_cap_scale: Any         # Param[tuple[ScaleStep, ...]]
    referral_window_days: Any         # Param[int]
    layers: tuple[Layer, ...]

    def layer(self, layer_id: str) -> Layer:
        for layer in self.layers:
            if layer.id == layer_id:
                return layer
        raise KeyError(layer_id)


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """A policy file as loaded: the structure with every parameter as a Dated series."""

    path: str
    sha: str
    template: Policy
    change_dates: tuple[date, ...]

    def snapshot(self, day: date) -> Policy:
        return _resolve(self.template, day)


def _resolve(obj: Any, day: date) -> Any:
    if isinstance(obj, Dated):
        return obj.at(day)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _resolve(getattr(obj, f.name), day) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple):
        return tuple(_resolve(x, day) for x in obj)
    if isinstance(obj, dict):
        return {k: _resolve(v, day) for k, v in obj.items()}
    return obj
