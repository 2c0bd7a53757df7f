"""Strict loading of policy files, and choosing the policy in force for a region and day.

Every problem is a ``PolicyFileError`` naming the file, the parameter path and what is wrong:
unknown or duplicate keys, a parameter without a clause reference, bad or unsorted dates,
negative amounts, rates outside 0–100 %, band edges that do not increase.
"""
from __future__ import annotations

import functools
import hashlib
import os
from datetime import date
from pathlib import Path
from typing import Any, Callable

import yaml

from engine.errors import NoPolicyInForce, PolicyFileError
from engine.policy import (
    FACTS, LAYER_KINDS, Adjustment, Band, Dated, Floor, Layer, Param, Policy, PolicyFile, Row,
    ScaleStep,
)
from engine.model import CLAIM_KINDS, GROUPS, LEVELS

BUNDLED = Path(__file__).parent / "policies"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# Dates stay strings until the reader parses them, so a bad one (2018-02-30) is reported with
# its parameter path instead of failing inside the YAML parser.
_StrictLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Reader:
    """Walks one file's parsed YAML, turning every problem into a located PolicyFileError."""

    def __init__(self, file: str):
        self.file = file
        self.dates: set[date] = set()

    def fail(self, path: str, problem: str) -> PolicyFileError:
        return PolicyFileError(self.file, path or "(top level)", problem)

    def mapping(self, obj: Any, path: str, required: set[str], optional: set[str] = frozenset()):
        if not isinstance(obj, dict):
            raise self.fail(path, f"must be a mapping, got {type(obj).__name__}")
        unknown = set(obj) - required - set(optional)
        if unknown:
            raise self.fail(path, f"unknown key(s) {sorted(map(str, unknown))}")
        missing = required - set(obj)
        if missing:
            raise self.fail(path, f"missing key(s) {sorted(missing)}")
        return obj

    def day(self, obj: Any, path: str) -> date:
        try:
            return date.fromisoformat(obj) if isinstance(obj, str) and len(obj) == 10 else \
                date.fromisoformat("not a date")
        except ValueError:
            raise self.fail(path, f"{obj!r} is not a date (YYYY-MM-DD)") from None

    def text(self, obj: Any, path: str) -> str:
        if not isinstance(obj, str) or not obj.strip():
            raise self.fail(path, "must be a non-empty string")
        return obj

    def ref(self, obj: dict, path: str) -> str:
        if "ref" not in obj:
            raise self.fail(path, "missing clause reference 'ref'")
        return self.text(obj["ref"], f"{path}.ref")

    def facts(self, obj: Any, path: str, allowed=FACTS) -> frozenset[str]:
        if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
            raise self.fail(path, "must be a list of names")
        bad = [x for x in obj if x not in allowed]
        if bad:
            raise self.fail(path, f"unknown name(s) {bad}; known: {list(allowed)}")
        return frozenset(obj)

    def dated(self, obj: Any, path: str, check: Callable[[Any, str], Any],
              extra: set[str] = frozenset()) -> Dated:
        """A parameter: ``{DATE: {value: V, ref: "clause"}, ...}`` in increasing date order."""
        if not isinstance(obj, dict) or not obj:
            raise self.fail(path, "must map effective dates to {value, ref}")
        points, last = [], None
        for key, entry in obj.items():
            if key in extra:
                continue
            key = self.day(key, f"{path}.{key}")
            if last is not None and key <= last:
                raise self.fail(path, f"dates not in increasing order: {key} after {last}")
            last = key
            where = f"{path}.{key}"
            self.mapping(entry, where, {"value"}, {"ref"})
            ref = self.ref(entry, where)
            points.append(Param(check(entry["value"], f"{where}.value"), ref, key))
            self.dates.add(key)
        if not points:
            raise self.fail(path, "has no dated value")
        return Dated(tuple(points))

    # --- value checks -------------------------------------------------------------------
    def _int(self, v: Any, path: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(path, f"must be an integer, got {v!r}")
        return v

    def amount(self, v: Any, path: str) -> int:
        v = self._int(v, path)
        if v < 0:
            raise self.fail(path, f"amount must not be negative, got {v}")
        return v

    def delta_amount(self, v: Any, path: str) -> int:
        return self._int(v, path)

    def rate(self, v: Any, path: str) -> int:
        v = self._int(v, path)
        if not 0 <= v <= 10_000:
            raise self.fail(path, f"rate must be within 0–10000 bp (0–100%), got {v}")
        return v

    def delta_rate(self, v: Any, path: str) -> int:
        v = self._int(v, path)
        if not -10_000 <= v <= 10_000:
            raise self.fail(path, f"rate change must be within ±10000 bp, got {v}")
        return v

    def divisor(self, v: Any, path: str) -> int:
        v = self._int(v, path)
        if v < 1:
            raise self.fail(path, f"divisor must be at least 1, got {v}")
        return v

    def bands(self, v: Any, path: str) -> tuple[Band, ...]:
        if not isinstance(v, list) or not v:
            raise self.fail(path, "must be a non-empty list of {from_fen, rate_bp}")
        out = []
        for i, b in enumerate(v):
            where = f"{path}[{i}]"
            self.mapping(b, where, {"from_fen", "rate_bp"})
            band = Band(self.amount(b["from_fen"], f"{where}.from_fen"),
                        self.rate(b["rate_bp"], f"{where}.rate_bp"))
            if out and band.from_fen <= out[-1].from_fen:
                raise self.fail(where, f"band edges must increase: {band.from_fen} after "
                                       f"{out[-1].from_fen}")
            out.append(band)
        if out[0].from_fen != 0:
            raise self.fail(f"{path}[0].from_fen", "the first band must start at 0")
        return tuple(out)

    def scale(self, v: Any, path: str) -> tuple[ScaleStep, ...]:
        if not isinstance(v, list) or not v:
            raise self.fail(path, "must be a non-empty list of {upto_months, scale_bp}")
        out: list[ScaleStep] = []
        for i, s in enumerate(v):
            where = f"{path}[{i}]"
            self.mapping(s, where, {"upto_months", "scale_bp"})
            upto = s["upto_months"]
            last = i == len(v) - 1
            if last != (upto is None):
                raise self.fail(f"{where}.upto_months", "only the last step is open (null)")
            if upto is not None:
                upto = self.amount(upto, f"{where}.upto_months")
                if out and upto <= out[-1].upto_months:
                    raise self.fail(where, f"band edges must increase: {upto} after "
                                           f"{out[-1].upto_months}")
            out.append(ScaleStep(upto, self.rate(s["scale_bp"], f"{where}.scale_bp")))
        return tuple(out)

    def by_level(self, v: Any, path: str, check) -> dict[str, Dated]:
        self.mapping(v, path, set(LEVELS))
        return {lvl: self.dated(v[lvl], f"{path}.{lvl}", check) for lvl in LEVELS}

    # --- structure ----------------------------------------------------------------------
    def adjustment(self, a: Any, path: str) -> Adjustment:
        effects = {"deductible_fen": self.amount, "deductible_delta_fen": self.delta_amount,
                   "rate_bp": self.rate, "rate_delta_bp": self.delta_rate,
                   "rate_divisor": self.divisor}
        self.mapping(a, path, {"when", "ref"}, set(effects))
        if not set(a) & set(effects):
            raise self.fail(path, f"has no effect; give one of {sorted(effects)}")
        kw = {k: self.dated(a[k], f"{path}.{k}", check) for k, check in effects.items() if k in a}
        return Adjustment(self.facts(a["when"], f"{path}.when"), self.ref(a, path), **kw)

    def row(self, r: Any, path: str) -> Row:
        self.mapping(r, path, {"groups", "ref", "bands"},
                     {"threshold_share_bp", "annual_cap_fen", "cap_scaled_by_continuity"})
        cap = r.get("annual_cap_fen")
        return Row(
            groups=self.facts(r["groups"], f"{path}.groups", GROUPS),
            ref=self.ref(r, path),
            bands=self.dated(r["bands"], f"{path}.bands", self.bands),
            threshold_share_bp=(self.dated(r["threshold_share_bp"], f"{path}.threshold_share_bp",
                                           self.rate) if "threshold_share_bp" in r else None),
            annual_cap_fen=None if cap is None else self.dated(cap, f"{path}.annual_cap_fen",
                                                               self.amount),
            cap_scaled_by_continuity=self.flag(r, "cap_scaled_by_continuity", path),
        )

    def flag(self, obj: dict, key: str, path: str) -> bool:
        v = obj.get(key, False)
        if not isinstance(v, bool):
            raise self.fail(f"{path}.{key}", f"must be true or false, got {v!r}")
        return v

    def layer(self, raw: Any, path: str) -> Layer:
        common = {"id", "fund", "kind", "claim_kind", "ref"}
        optional_by_kind = {
            "deductible_rate": {"when", "adjustments", "deductible_fen", "annual_cap_fen",
                                "cap_scaled_by_continuity", "referral_chain_deductible",
                                "childbirth_floor_fen"},
            "marginal_bands": {"when", "adjustments", "threshold_fen"},
            "allowance_rate": {"when", "adjustments", "yearly_allowance_fen",
                               "monthly_allowance_fen"},
        }
        required_by_kind = {"deductible_rate": {"rate_bp"}, "marginal_bands": {"rows"},
                            "allowance_rate": {"rate_bp"}}
        if not isinstance(raw, dict):
            raise self.fail(path, "must be a mapping")
        kind = raw.get("kind")
        if kind not in LAYER_KINDS:
            raise self.fail(f"{path}.kind", f"unknown layer kind {kind!r}; known: "
                                            f"{list(LAYER_KINDS)}")
        self.mapping(raw, path, common | required_by_kind[kind], optional_by_kind[kind])
        claim_kind = raw["claim_kind"]
        if claim_kind not in CLAIM_KINDS:
            raise self.fail(f"{path}.claim_kind", f"unknown claim kind {claim_kind!r}")
        kw: dict[str, Any] = dict(
            id=self.text(raw["id"], f"{path}.id"), fund=self.text(raw["fund"], f"{path}.fund"),
            kind=kind, claim_kind=claim_kind, ref=self.ref(raw, path),
            when=self.facts(raw.get("when", []), f"{path}.when"),
            adjustments=tuple(self.adjustment(a, f"{path}.adjustments[{i}]")
                              for i, a in enumerate(self._list(raw.get("adjustments", []),
                                                               f"{path}.adjustments"))),
        )
        if kind == "deductible_rate":
            rate = raw["rate_bp"]
            kw["rate_bp"] = (self.by_level(rate, f"{path}.rate_bp", self.rate)
                             if isinstance(rate, dict) and set(rate) & set(LEVELS)
                             else self._all_levels(self.dated(rate, f"{path}.rate_bp", self.rate)))
            kw["deductible_fen"] = (self.by_level(raw["deductible_fen"], f"{path}.deductible_fen",
                                                  self.amount)
                                    if "deductible_fen" in raw else None)
            if "annual_cap_fen" in raw:
                kw["annual_cap_fen"] = self.dated(raw["annual_cap_fen"], f"{path}.annual_cap_fen",
                                                  self.amount)
            kw["cap_scaled_by_continuity"] = self.flag(raw, "cap_scaled_by_continuity", path)
            if "referral_chain_deductible" in raw:
                r = self.mapping(raw["referral_chain_deductible"],
                                 f"{path}.referral_chain_deductible", {"ref"})
                kw["referral_chain_ref"] = self.ref(r, f"{path}.referral_chain_deductible")
            if "childbirth_floor_fen" in raw:
                fl = raw["childbirth_floor_fen"]
                where = f"{path}.childbirth_floor_fen"
                if not isinstance(fl, dict) or "when" not in fl:
                    raise self.fail(where, "missing key(s) ['when']")
                kw["childbirth_floor"] = Floor(self.facts(fl["when"], f"{where}.when"),
                                               self.dated(fl, where, self.amount, {"when"}))
        elif kind == "marginal_bands":
            rows = self._list(raw["rows"], f"{path}.rows")
            if not rows:
                raise self.fail(f"{path}.rows", "must list at least one row")
            kw["rows"] = tuple(self.row(r, f"{path}.rows[{i}]") for i, r in enumerate(rows))
            if kw["rows"][-1].groups:
                raise self.fail(f"{path}.rows[{len(rows) - 1}].groups",
                                "the last row must catch everyone else (groups: [])")
            if "threshold_fen" in raw:
                kw["threshold_fen"] = self.dated(raw["threshold_fen"], f"{path}.threshold_fen",
                                                 self.amount)
        else:
            kw["rate_bp"] = self.dated(raw["rate_bp"], f"{path}.rate_bp", self.rate)
            allowances = [k for k in ("yearly_allowance_fen", "monthly_allowance_fen") if k in raw]
            if len(allowances) != 1:
                raise self.fail(path, "needs exactly one of yearly_allowance_fen, "
                                      "monthly_allowance_fen")
            kw[allowances[0]] = self.dated(raw[allowances[0]], f"{path}.{allowances[0]}",
                                           self.amount)
        return Layer(**kw)

    def _all_levels(self, d: Dated) -> dict[str, Dated]:
        return {lvl: d for lvl in LEVELS}

    def _list(self, v: Any, path: str) -> list:
        if not isinstance(v, list):
            raise self.fail(path, "must be a list")
        return v


def load_policy_file(path: str | os.PathLike) -> PolicyFile:
    path = Path(path)
    raw_bytes = path.read_bytes()
    rd = _Reader(str(path))
    try:
        raw = yaml.load(raw_bytes, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise rd.fail("", f"not valid YAML: {e}") from None

    rd.mapping(raw, "", {"region", "effective", "layers", "continuity_cap_scale",
                         "referral_window_days"}, {"title"})
    effective = rd.day(raw["effective"], "effective")
    layers_raw = rd._list(raw["layers"], "layers")
    layers = tuple(rd.layer(x, f"layers[{i}]") for i, x in enumerate(layers_raw))
    ids = [x.id for x in layers]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise rd.fail("layers", f"duplicate layer id(s) {sorted(dup)}")
    sha = hashlib.sha256(raw_bytes).hexdigest()[:12]
    template = Policy(
        region=rd.text(raw["region"], "region"),
        effective=effective,
        version=f"{raw['region']}/{effective.isoformat()}#{sha}",
        continuity_cap_scale=rd.dated(raw["continuity_cap_scale"], "continuity_cap_scale",
                                      rd.scale),
        referral_window_days=rd.dated(raw["referral_window_days"], "referral_window_days",
                                      rd.amount),
        layers=layers,
    )
    pf = PolicyFile(str(path), sha, template, tuple(sorted(d for d in rd.dates if d > effective)))
    _check_complete(pf, rd)
    return pf


def _check_complete(pf: PolicyFile, rd: _Reader) -> None:
    """Every parameter must have a value on the file's effective date."""
    import dataclasses

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, Dated):
            if obj.at(pf.template.effective) is None:
                raise rd.fail(path, f"has no value in force on the file's effective date "
                                    f"{pf.template.effective}")
        elif dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
        elif isinstance(obj, tuple):
            for i, x in enumerate(obj):
                walk(x, f"{path}[{i}]")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
    walk(pf.template, "")


class PolicyStore:
    """All policy files of a folder tree (``<root>/<region>/<effective>.yaml``), loaded strictly."""

    def __init__(self, root: str | os.PathLike = BUNDLED):
        self.root = Path(root)
        self.files: dict[str, list[PolicyFile]] = {}
        for region_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = [load_policy_file(f) for f in sorted(region_dir.glob("*.yaml"))]
            for f in files:
                if f.template.region != region_dir.name:
                    raise PolicyFileError(f.path, "region", f"is {f.template.region!r} but the "
                                          f"file lies in folder {region_dir.name!r}")
            files.sort(key=lambda f: f.template.effective)
            if files:
                self.files[region_dir.name] = files
        self._snap = functools.lru_cache(maxsize=256)(self._snapshot)

    def regions(self) -> list[str]:
        return sorted(self.files)

    def policy_for(self, region: str, day: date) -> Policy:
        """The policy in force for ``region`` on ``day``; a clear error before the first one."""
        files = self.files.get(region)
        if not files:
            raise NoPolicyInForce("region", f"unknown region {region!r}; known: {self.regions()}")
        chosen = None
        for f in files:
            if f.template.effective <= day:
                chosen = f
        if chosen is None:
            raise NoPolicyInForce("date", f"no {region} policy in force on {day}: the first "
                                          f"takes effect on {files[0].template.effective}")
        # Snapshots only differ at change dates: cache one per (file, last change on or before).
        key_date = chosen.template.effective
        for d in chosen.change_dates:
            if d <= day:
                key_date = d
        return self._snap(chosen.path, key_date)

    def _snapshot(self, path: str, day: date) -> Policy:
        for files in self.files.values():
            for f in files:
                if f.path == path:
                    return f.snapshot(day)
        raise KeyError(path)


@functools.lru_cache(maxsize=8)
def store(root: str | None = None) -> PolicyStore:
    """The policy store for a folder (default: the bundled policies), loaded once."""
    return PolicyStore(root or BUNDLED)
