"""Recompute the ledger's derived state from its journal and report every difference.

    python -m server.ledger.verify --database PATH_OR_URL     # exit 0 clean, 1 differences

Safe to run at any time against a live database: everything is read in one consistent snapshot
(a SQLite read transaction, a PostgreSQL REPEATABLE READ READ ONLY transaction); nothing is
written.

What is checked
  Accumulators  every member-year-layer equals the sum of the deltas of that member-year's
                SETTLED settlements (a missing row counts as zero; a row no settlement explains
                is a difference).
  Journal       status is SETTLED or REVERSED, ``reversed_at`` is set exactly for REVERSED rows,
                deltas and account payments are non-negative, the member exists.
  Balances      The opening balance of an account comes from outside (``upsert_member`` sets it
                absolutely), so it cannot be derived from settlements alone. Instead every change
                is an ``account_movements`` row numbered 1, 2, … per member under the member's
                row lock: SET (a new absolute balance from the registry), SETTLE (−account paid),
                REVERSE (+account paid), each with the balance after it. Verify replays them:
                numbering contiguous from 1 and ending at the member's ``account_seq``, the first
                movement a SET, each ``balance_after`` equal to the running balance, the last
                equal to the member's ``account_balance_fen``. And it ties them to the journal:
                every settlement that paid from the account has exactly one SETTLE movement of
                that amount for its member, a REVERSED one also exactly one later REVERSE
                movement, a SETTLED one none; no movement names an unknown settlement. Hence
                balance = last SET − Σ account paid of SETTLE movements since + Σ REVERSE since,
                each of which is a journal fact.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

from server.ledger.sqlbase import Audit


@dataclass(frozen=True)
class Summary:
    members: int
    member_years: int
    settlements: int
    reversed: int
    movements: int


def verify(ledger) -> list[str]:
    """Every difference between the ledger's stored and recomputed state (empty: clean)."""
    return check(_audit(ledger))[0]


def _audit(ledger) -> Audit:
    if not hasattr(ledger, "audit"):
        raise TypeError(f"{type(ledger).__name__} has no audit(): verify needs a SQL ledger")
    return ledger.audit()


def check(a: Audit) -> tuple[list[str], Summary]:
    out: list[str] = []
    members = {m: (bal, seq) for m, bal, seq in a.members}
    by_id = {s.settlement_id: s for s in a.settlements}

    # --- journal sanity and the accumulators it implies -----------------------------------
    expected: dict[tuple[str, int, str], list[int]] = defaultdict(lambda: [0, 0])
    for s in a.settlements:
        where = f"settlement {s.settlement_id} (member {s.member_id}, {s.year})"
        if s.member_id not in members:
            out.append(f"{where}: member is not registered")
        if s.status not in ("SETTLED", "REVERSED"):
            out.append(f"{where}: unknown status {s.status!r}")
        if (s.reversed_at is not None) != (s.status == "REVERSED"):
            out.append(f"{where}: status {s.status} but reversed_at {s.reversed_at}")
        if s.account_paid_fen < 0:
            out.append(f"{where}: negative account payment {s.account_paid_fen}")
        for layer, (paid, base) in s.deltas.items():
            if paid < 0 or base < 0:
                out.append(f"{where}: negative delta {layer} ({paid}, {base})")
            if s.status == "SETTLED":
                e = expected[(s.member_id, s.year, layer)]
                e[0] += paid
                e[1] += base

    stored = {(m, y, l): (p, b) for m, y, l, p, b in a.accumulators}
    for key in sorted(set(stored) | set(expected)):
        have = stored.get(key, (0, 0))
        want = tuple(expected.get(key, (0, 0)))
        if have != want:
            m, y, l = key
            out.append(f"accumulators {m}/{y}/{l}: stored paid {have[0]} base {have[1]}, "
                       f"journal says paid {want[0]} base {want[1]}")

    # --- account movements ------------------------------------------------------------------
    moves: dict[str, list[tuple]] = defaultdict(list)
    for mv in a.movements:
        moves[mv[0]].append(mv)
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)   # (settlement, kind) -> seqs
    for m in sorted(set(members) | set(moves)):
        ms = sorted(moves.get(m, []), key=lambda mv: mv[1])
        if m not in members:
            out.append(f"account {m}: {len(ms)} movements of an unregistered member")
            continue
        balance, last_seq = members[m]
        if not ms:
            out.append(f"account {m}: no movements (a registration records its opening SET)")
            continue
        if ms[0][2] != "SET":
            out.append(f"account {m}: first movement is {ms[0][2]}, not the opening SET")
        running = 0
        for i, (_, seq, kind, amount, sid, after) in enumerate(ms, start=1):
            if seq != i:
                out.append(f"account {m}: movement numbered {seq} where {i} was expected")
            if kind == "SET":
                running = amount
                if sid is not None:
                    out.append(f"account {m} movement {seq}: SET names settlement {sid}")
            elif kind in ("SETTLE", "REVERSE"):
                running += amount
                s = by_id.get(sid)
                if s is None:
                    out.append(f"account {m} movement {seq}: {kind} of unknown settlement {sid}")
                else:
                    seen[(sid, kind)].append(seq)
                    want = -s.account_paid_fen if kind == "SETTLE" else s.account_paid_fen
                    if s.member_id != m:
                        out.append(f"account {m} movement {seq}: {kind} of settlement {sid} "
                                   f"of member {s.member_id}")
                    if amount != want:
                        out.append(f"account {m} movement {seq}: {kind} of {amount} fen, "
                                   f"settlement {sid} says {want}")
            else:
                out.append(f"account {m} movement {seq}: unknown kind {kind!r}")
            if after != running:
                out.append(f"account {m} movement {seq}: balance after {after}, "
                           f"replay gives {running}")
        if running != balance:
            out.append(f"account {m}: balance {balance}, movements give {running}")
        if last_seq != len(ms):
            out.append(f"account {m}: account_seq {last_seq} but {len(ms)} movements")

    for s in a.settlements:
        if not s.account_paid_fen:
            continue
        sid = s.settlement_id
        settles, reverses = seen.get((sid, "SETTLE"), []), seen.get((sid, "REVERSE"), [])
        if len(settles) != 1:
            out.append(f"settlement {sid}: paid {s.account_paid_fen} fen from the account "
                       f"but has {len(settles)} SETTLE movements")
        want_rev = 1 if s.status == "REVERSED" else 0
        if len(reverses) != want_rev:
            out.append(f"settlement {sid}: {s.status} but has {len(reverses)} REVERSE "
                       "movements")
        elif settles and reverses and reverses[0] < settles[0]:
            out.append(f"settlement {sid}: credited back before it was debited")

    summary = Summary(
        members=len(members),
        member_years=len({(m, y) for m, y, _ in set(stored) | set(expected)}),
        settlements=len(a.settlements),
        reversed=sum(s.status == "REVERSED" for s in a.settlements),
        movements=len(a.movements))
    return out, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m server.ledger.verify",
        description="Recompute every member-year's accumulators and every account balance "
                    "from the settlement journal and report each difference (exit 1).")
    p.add_argument("--database", default=os.environ.get("REIMBURSE_DATABASE"),
                   help="SQLite file path or postgresql:// URL (env REIMBURSE_DATABASE)")
    args = p.parse_args(argv)
    if not args.database:
        p.error("--database is required")
    url = args.database
    is_pg = url.startswith(("postgresql://", "postgres://"))
    path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    if not is_pg and not os.path.exists(path):
        print(f"verify: no ledger database at {path}", file=sys.stderr)
        return 2
    from server.ledger.base import open_ledger
    try:
        ledger = open_ledger(url)
    except Exception as e:  # noqa: BLE001 — an operator tool: say why and exit 2
        print(f"verify: cannot open the ledger database: {e}", file=sys.stderr)
        return 2
    try:
        diffs, s = check(_audit(ledger))
    finally:
        ledger.close()
    for d in diffs:
        print(d)
    what = (f"{s.members} members, {s.member_years} member-years, {s.settlements} settlements "
            f"({s.reversed} reversed), {s.movements} account movements")
    if diffs:
        print(f"verify: {len(diffs)} difference(s) in {what}")
        return 1
    print(f"verify: clean — {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
