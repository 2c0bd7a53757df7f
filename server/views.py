"""Read-only views for people: a member's caps and bands, and the parameters of a policy.

Pure functions of a policy snapshot, a member and accumulators; they restate what the
reference evaluator (``engine.reference``) applies, so the numbers shown are the ones used.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import date
from typing import Any, Iterator

from engine.model import GROUPS, Accumulators, Member
from engine.money import BP
from engine.policy import Layer, Param, Policy
from engine.reference import cap_scale_bp
from reimburse.v1 import policy_pb2 as pol
from reimburse.v1 import types_pb2 as ty
from server.convert import FUND, KIND_WIRE, wire_date

# Facts a layer's ``when`` can hold that depend on the member alone; the others (facility,
# claim flags) are decided per claim, so a view shows every layer they could open.
MEMBER_FACTS = frozenset({"EMPLOYEE", "RESIDENT", "RETIRED", "MATERNITY_ELIGIBLE", *GROUPS})


def member_facts(m: Member) -> frozenset[str]:
    facts = {m.identity, *m.groups}
    if m.retired:
        facts.add("RETIRED")
    if m.maternity_eligible:
        facts.add("MATERNITY_ELIGIBLE")
    return frozenset(facts)


def continuous_months(m: Member, day: date) -> int:
    """二(四)4 as in the reference; 0 before contributions began (the smallest scale applies)."""
    since = m.continuous_since
    return max(0, (day.year * 12 + day.month) - (since.year * 12 + since.month) + 1)


def _scaled(cap: int, scaled: bool, scale_bp: int) -> int:
    return cap * scale_bp // BP if scaled else cap


def accumulators_view(policy: Policy, member: Member, member_id: str, acc: Accumulators,
                      day: date, balance_fen: int) -> ty.Accumulators:
    """Used and remaining of every cap and allowance that can apply to the member on ``day``,
    the cumulative bases, the current marginal band and the distance to the next edge."""
    months = continuous_months(member, day)
    scale = cap_scale_bp(policy, months)
    facts = member_facts(member)
    out = ty.Accumulators(member_id=member_id, year=acc.year, as_of=wire_date(day),
                          account_balance_fen=balance_fen, policy_version=policy.version,
                          continuous_months=months, cap_scale_bp=scale)
    for layer in policy.layers:
        if not (layer.when & MEMBER_FACTS) <= facts:
            continue
        v = out.layers.add(layer_id=layer.id, fund=FUND.get(layer.fund, ty.FUND_UNSPECIFIED),
                           fund_code=layer.fund, clause=layer.ref,
                           paid_fen=acc.paid_of(layer.id),
                           cumulative_base_fen=acc.base_of(layer.id))
        limit = _limit(layer, member, scale, day)
        if limit is not None:
            v.limit_fen = limit
            v.remaining_fen = max(0, limit - v.paid_fen)
        if layer.kind == "marginal_bands":
            _band_position(layer, member, v)
    return out


def _row(layer: Layer, member: Member):
    return next(r for r in layer.rows if not r.groups or r.groups & member.groups)


def _limit(layer: Layer, member: Member, scale: int, day: date) -> int | None:
    if layer.kind == "deductible_rate":
        cap = layer.annual_cap_fen
        return None if cap is None else _scaled(cap.value, layer.cap_scaled_by_continuity, scale)
    if layer.kind == "marginal_bands":
        row = _row(layer, member)
        cap = row.annual_cap_fen
        return None if cap is None else _scaled(cap.value, row.cap_scaled_by_continuity, scale)
    if layer.yearly_allowance_fen is not None:
        return layer.yearly_allowance_fen.value
    return layer.monthly_allowance_fen.value * day.month  # carried over within the year


def _band_position(layer: Layer, member: Member, v: ty.LayerAccumulator) -> None:
    row = _row(layer, member)
    threshold = layer.threshold_fen.value if layer.threshold_fen else 0
    if row.threshold_share_bp is not None:
        threshold = threshold * row.threshold_share_bp.value // BP
    c = v.cumulative_base_fen
    if c < threshold:  # below the threshold nothing is paid yet
        v.current_rate_bp = 0
        v.to_next_band_fen = threshold - c
        return
    bands = row.bands.value
    i = max(k for k, b in enumerate(bands) if b.from_fen <= c)
    v.current_rate_bp = bands[i].rate_bp
    if i + 1 < len(bands):
        v.to_next_band_fen = bands[i + 1].from_fen - c


# --- policy parameters -------------------------------------------------------------------

def _json(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return json.dumps(dataclasses.asdict(value))
    if isinstance(value, tuple):
        return json.dumps([dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x
                           for x in value])
    return json.dumps(value)


def _params(obj: Any, path: str) -> Iterator[tuple[str, Param]]:
    if isinstance(obj, Param):
        yield path, obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _params(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _params(v, f"{path}.{k}")
    elif isinstance(obj, tuple):
        for i, x in enumerate(obj):
            yield from _params(x, f"{path}[{i}]")


def policy_view(policy: Policy) -> pol.Policy:
    out = pol.Policy(region=policy.region, version=policy.version,
                     effective=wire_date(policy.effective))
    top = [("continuity_cap_scale", policy.continuity_cap_scale),
           ("referral_window_days", policy.referral_window_days)]
    for layer in policy.layers:
        out.layers.add(layer_id=layer.id, fund=FUND.get(layer.fund, ty.FUND_UNSPECIFIED),
                       fund_code=layer.fund, kind=layer.kind,
                       claim_kind=KIND_WIRE[layer.claim_kind], when=sorted(layer.when),
                       clause=layer.ref)
        top.append((f"layers.{layer.id}", layer))
    for name, obj in top:
        for path, p in _params(obj, name):
            out.parameters.add(path=path, value_json=_json(p.value), clause=p.ref,
                               since=wire_date(p.since))
    return out
