"""SQLite's own cost of a batch's journal rows: what bounds durable batch settlement.

    python -m benchmarks.journal                   # the ledger's schema, one line
    python -m benchmarks.journal --all             # and the variants below, interleaved

A fresh ledger file with the ledger's own schema and settings (``server.ledger.schema``, WAL,
``synchronous=FULL``, foreign keys on), 2,000 members and 24 facilities; then batches of
``--rows`` journal rows shaped as ``SettleBatch`` writes them (time-ordered settlement ids, a
300-byte stored reply, ten claims a member), each inserted with one ``executemany`` and
committed, timed in milliseconds per batch (the mean after three unmeasured batches). No Python
per row is timed: the rows are built before the clock starts. The variants change one thing:
``no-fk`` foreign keys off, ``without-rowid`` the settlements table ``WITHOUT ROWID``,
``no-member-index`` without ``settlements_member``.
"""
from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import time

from server.ledger import schema

VARIANTS = ("ledger", "no-fk", "without-rowid", "no-member-index")


def _open(path: str, variant: str) -> sqlite3.Connection:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=FULL")
    c.execute("PRAGMA foreign_keys=" + ("OFF" if variant == "no-fk" else "ON"))
    for i in range(schema.VERSION):
        for s in schema.statements("sqlite", i):
            if variant == "without-rowid" and "CREATE TABLE IF NOT EXISTS settlements" in s:
                s = s.rstrip() + " WITHOUT ROWID"
            if variant == "no-member-index" and "settlements_member" in s:
                continue
            c.execute(s)
    c.execute("BEGIN")
    c.executemany("INSERT INTO facilities VALUES (?, 'LEVEL_1', 1, '', '', '2026-01-01')",
                  [(f"H{k}",) for k in range(24)])
    c.executemany("INSERT INTO members VALUES (?, 'EMPLOYEE', '2010-01-01', 0, '[]', 0, NULL, "
                  "NULL, NULL, NULL, '', 'jiangmen', 100000, 0, '2026-01-01')",
                  [(f"M{m}",) for m in range(2000)])
    c.execute("COMMIT")
    return c


def measure(variant: str, batches: int, rows: int, seed: int = 1) -> dict:
    """Mean milliseconds per batch of ``rows`` journal rows: insert and commit."""
    with tempfile.TemporaryDirectory() as d:
        c = _open(os.path.join(d, "journal.db"), variant)
        cols = [r[1] for r in c.execute("PRAGMA table_info(settlements)")]
        sql = (f"INSERT INTO settlements ({', '.join(cols)}) "
               f"VALUES ({', '.join('?' * len(cols))})")
        rng = random.Random(seed)
        reply = bytes(rng.randrange(256) for _ in range(300))
        seq, ins, com = 0, 0.0, 0.0
        for b in range(batches + 3):
            members = rng.sample(range(2000), max(1, rows // 10))
            batch = []
            for k in range(rows):
                seq += 1
                batch.append((f"{0x18000000000 + seq:016x}{rng.getrandbits(64):016x}",
                              f"H{rng.randrange(24)}", f"run-{b}-{k}",
                              f"{rng.getrandbits(256):064x}", f"M{members[k // 10]}", 2019,
                              "SETTLED", '{"inpatient_tier1": [12345, 67890]}', 0, 0,
                              "jiangmen/2018-01-01", 1234, reply,
                              "2026-12-03T13:00:00.000000+00:00", None))
            t0 = time.perf_counter()
            c.execute("BEGIN")
            c.executemany(sql, batch)
            t1 = time.perf_counter()
            c.execute("COMMIT")
            t2 = time.perf_counter()
            if b >= 3:
                ins += t1 - t0
                com += t2 - t1
        c.close()
    return {"variant": variant, "rows": rows, "insert_ms": round(ins / batches * 1e3, 2),
            "commit_ms": round(com / batches * 1e3, 2),
            "rows_per_s": round(rows * batches / (ins + com))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.journal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="also the variants, interleaved")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--rows", type=int, default=1000, help="journal rows per batch")
    ap.add_argument("--rounds", type=int, default=2, help="repeat the list (with --all)")
    args = ap.parse_args(argv)
    variants = VARIANTS if args.all else VARIANTS[:1]
    for _ in range(args.rounds if args.all else 1):
        for v in variants:
            r = measure(v, args.batches, args.rows)
            print(f"{r['variant']:16s} insert {r['insert_ms']:6.1f} ms  commit "
                  f"{r['commit_ms']:6.1f} ms  per {r['rows']} rows: {r['rows_per_s']:,} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
