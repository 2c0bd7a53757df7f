"""Builders shared by the rule, invariant and payer-layer tests.

Tests speak yuan strings ("5335.00") in their expectations, as the spec and scenario files do;
the builders turn them into the engine's fen. ``impl`` is the fixture that runs a test once
through the reference evaluator and once through the Cython kernel (skipped, with the reason,
only while the kernel is not built).

Import what a module needs, including the fixture::

    from engine_helpers import impl, member, inpatient, run   # noqa: F401  (impl is a fixture)
"""
from __future__ import annotations

import dataclasses
from datetime import date
from pathlib import Path
from typing import Iterable, Sequence

import pytest

from engine.evaluate import kernel_available, settle
from engine.loader import PolicyStore, store
from engine.model import Accumulators, Bill, Claim, LineItem, Member, Settlement
from engine.money import format_yuan, parse_ratio_bp, parse_yuan

FIXTURES = Path(__file__).parent / "fixtures" / "policies"

IMPL_PARAMS = [
    "reference",
    pytest.param("kernel", marks=pytest.mark.skipif(
        not kernel_available(), reason="the Cython kernel (engine._kernel) is not built")),
]


# For tests that cannot take a function-scoped fixture (hypothesis ``@given``): an explicit
# parametrize over the same two implementations.
both_impls = pytest.mark.parametrize("impl", IMPL_PARAMS)


@pytest.fixture(params=IMPL_PARAMS)
def impl(request) -> str:
    """Each test using this fixture runs against the reference and against the kernel."""
    return request.param


# --- money -------------------------------------------------------------------------------------

def fen(yuan: str) -> int:
    """'1234.50' → 123450."""
    return parse_yuan(yuan, "test")


def yuan(amount_fen: int) -> str:
    return format_yuan(amount_fen)


# --- members and claims -------------------------------------------------------------------------

# Facilities the builders know, by id: the level comes from this registry, as in the service.
FACILITIES = {
    "P1": "LEVEL_1",          # the member's selected primary facility
    "O1": "LEVEL_2",          # the employee's other selected facility
    "O2": "LEVEL_2",          # a facility the member did not select
    "H1": "LEVEL_1",
    "H2": "LEVEL_2",
    "H3": "LEVEL_3",
    "X9": "NON_DESIGNATED",
}
HOSPITAL_OF_LEVEL = {"LEVEL_1": "H1", "LEVEL_2": "H2", "LEVEL_3": "H3", "NON_DESIGNATED": "X9"}


def member(identity: str = "EMPLOYEE", *, since: date = date(2010, 1, 1), retired: bool = False,
           groups: Iterable[str] = (), maternity: bool = False, primary: str | None = "P1",
           other: str | None = None) -> Member:
    """A member with a long contribution run (full caps) unless ``since`` says otherwise.

    Employees select O1 as their other facility by default; residents select none.
    """
    if other is None and identity == "EMPLOYEE":
        other = "O1"
    return Member(identity=identity, continuous_since=since, retired=retired,
                  groups=frozenset(groups), maternity_eligible=maternity,
                  primary_facility=primary, other_facility=other)


def employee(**kw) -> Member:
    return member("EMPLOYEE", **kw)


def resident(**kw) -> Member:
    return member("RESIDENT", **kw)


def item(category: str, amount: str, *, allowed: str | None = None,
         ratio: str | None = None) -> LineItem:
    return LineItem(category, fen(amount), None if allowed is None else fen(allowed),
                    0 if ratio is None else parse_ratio_bp(ratio, "test"))


def bill(total: str, full_selfpay: str = "0", over_limit: str = "0",
         pre_selfpay: str = "0") -> Bill:
    return Bill(fen(total), fen(full_selfpay), fen(over_limit), fen(pre_selfpay))


def _bill_of(amount: str | None, items: Sequence[LineItem] | None, b: Bill | None):
    from engine.bill import bill_from_items
    given = [x is not None for x in (amount, items, b)]
    if sum(given) != 1:
        raise TypeError("give exactly one of an in-scope amount, items or a bill")
    if items is not None:
        return bill_from_items(items), tuple(items)
    if b is not None:
        return b, ()
    return Bill(fen(amount)), ()    # a class-A bill: everything in scope


def inpatient(amount: str | None = None, *, level: str = "LEVEL_3",
              day: date = date(2018, 6, 1), items: Sequence[LineItem] | None = None,
              bill: Bill | None = None, facility: str | None = None, referral_from: int | None = None,
              **flags) -> "Visit":
    """An admission; ``amount`` is a class-A bill of that many yuan, all within policy scope.

    ``referral_from`` is the index (in the sequence given to ``run``) of the earlier admission of
    the same referral chain. Other keywords are ``Claim`` flags (``childbirth=True``, …).
    """
    b, its = _bill_of(amount, items, bill)
    fid = facility or HOSPITAL_OF_LEVEL[level]
    claim = Claim(kind="INPATIENT", service_date=day, facility_id=fid,
                  facility_level=FACILITIES.get(fid, level), bill=b, items=its,
                  referral=referral_from is not None, **flags)
    return Visit(claim, referral_from)


def outpatient(amount: str | None = None, *, facility: str = "P1", day: date = date(2018, 6, 1),
               items: Sequence[LineItem] | None = None, bill: Bill | None = None,
               **flags) -> "Visit":
    """A visit; ``amount`` is a class-A bill of that many yuan."""
    b, its = _bill_of(amount, items, bill)
    claim = Claim(kind="OUTPATIENT", service_date=day, facility_id=facility,
                  facility_level=FACILITIES[facility], bill=b, items=its, **flags)
    return Visit(claim, None)


@dataclasses.dataclass(frozen=True)
class Visit:
    claim: Claim
    referral_from: int | None = None


# --- settling -----------------------------------------------------------------------------------

def policies(root: str | Path | None = None) -> PolicyStore:
    return store() if root is None else PolicyStore(root)


def run(impl: str, who: Member, visits: Sequence[Visit], *, balance: str = "0",
        policy_store: PolicyStore | None = None) -> list[Settlement]:
    """Settle the visits in order for one member, as the conformance command does.

    Accumulators are kept per calendar year (a new year starts from nothing, spec §"Units"),
    the personal-account balance carries from claim to claim, and a referral admission is
    given the deductible paid along its chain.
    """
    ps = policy_store or store()
    years: dict[int, Accumulators] = {}
    chain: list[int] = []
    bal = fen(balance)
    out = []
    for v in visits:
        claim = v.claim
        if v.referral_from is not None:
            claim = dataclasses.replace(claim, chain_deductible_fen=chain[v.referral_from])
        year = claim.service_date.year
        policy = ps.policy_for("jiangmen", claim.service_date)
        s = settle(policy, who, claim, years.get(year, Accumulators(year)), bal, impl=impl)
        years[year] = s.accumulators_after
        bal = s.balance_after_fen
        chain.append(s.chain_deductible_after_fen)
        out.append(s)
    return out


def one(impl: str, who: Member, visit: Visit, **kw) -> Settlement:
    """Settle a single claim on fresh accumulators."""
    return run(impl, who, [visit], **kw)[0]


def funds(s: Settlement) -> dict[str, str]:
    """Payment per fund in yuan, leaving out funds that paid nothing (the scenario format)."""
    return {k: yuan(v) for k, v in s.funds.items()}


def totals(s: Settlement) -> dict[str, str]:
    return {"in_scope": yuan(s.in_scope_fen), "deductible": yuan(s.deductible_fen),
            "fund_total": yuan(s.fund_total_fen), "patient_total": yuan(s.patient_total_fen),
            "account_paid": yuan(s.account_paid_fen), "cash": yuan(s.cash_fen)}


# --- test-only policy copies --------------------------------------------------------------------

BUNDLED_FILE = Path(__file__).resolve().parents[1] / "engine" / "policies" / "jiangmen" / "2018-01-01.yaml"


def policy_copy(tmp_path: Path, replacements: dict[str, str] | None = None,
                append: str = "") -> PolicyStore:
    """The bundled Jiangmen file copied under ``tmp_path/jiangmen/``, with exact text edits.

    Each ``old → new`` replacement must match the bundled text exactly once, so a test never
    silently edits nothing when the bundled file changes.
    """
    text = BUNDLED_FILE.read_text(encoding="utf-8")
    for old, new in (replacements or {}).items():
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the bundled file"
        text = text.replace(old, new)
    folder = tmp_path / "jiangmen"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "2018-01-01.yaml").write_text(text + append, encoding="utf-8")
    return PolicyStore(tmp_path)
