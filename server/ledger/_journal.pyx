# cython: language_level=3
"""What the ledger does per settlement of a batch, compiled: the outcome's check and the
journal row, accumulator additions and account movement it makes.

``SqlLedger.settle_batch`` runs one unit of work per batch in the ledger's one writer (on
SQLite, the group commit's thread), so every microsecond of it per claim is a millisecond per
1000-claim batch that every other writer waits through. This is the same Python the ledger
had (``check_outcome`` word for word), compiled by Cython; ``sqlbase`` uses it for single
settlements as well as batches, and the ledger contract tests hold both to the same results
and the same refusals.
"""
import json


def check_outcome(out, balance_fen):
    """The outcome's deltas, normalised (sorted, without (0, 0)), or ``ValueError``.

    The ledger refuses to commit what would break its invariants whatever the evaluator did:
    negative or non-integer deltas, an account payment that is negative or above the balance.
    """
    cdef dict deltas = {}
    for layer, pair in sorted(dict(out.deltas).items()):
        if type(layer) is not str or not layer:
            raise ValueError(f"outcome delta layer id {layer!r} is not a non-empty string")
        paid, base = pair
        # type(x) is int: a bool (or any other int subclass) is not an amount
        if type(paid) is not int or type(base) is not int or paid < 0 or base < 0:
            raise ValueError(f"outcome delta of layer {layer!r} is {pair!r}: need two ints >= 0")
        if paid or base:
            deltas[layer] = (paid, base)
    account = out.account_paid_fen
    if not (type(account) is int and type(out.chain_deductible_after_fen) is int
            and type(out.fund_total_fen) is int):
        name = next(n for n in ("account_paid_fen", "chain_deductible_after_fen",
                                "fund_total_fen") if type(getattr(out, n)) is not int)
        raise ValueError(f"outcome {name} is not an int: {getattr(out, name)!r}")
    if account < 0:
        raise ValueError(f"outcome account_paid_fen {account} is negative")
    if account > 0 and account > balance_fen:
        raise ValueError(f"outcome pays {account} fen from an account holding "
                         f"{balance_fen}")
    if not isinstance(out.policy_version, str):
        raise ValueError(f"outcome policy_version is not a string: {out.policy_version!r}")
    if not isinstance(out.result, (bytes, bytearray, memoryview)):
        raise ValueError("outcome result is not bytes")
    return deltas


cdef dict _KEYS = {}   # layer id -> its JSON string and ': [' (layer ids are few)


def deltas_text(dict deltas):
    """``json.dumps`` of ``{layer: [paid, base]}`` for ``check_outcome``'s deltas (keys sorted,
    ints): the text SQLite stores in the journal's deltas column."""
    cdef list parts = []
    for k, pair in deltas.items():
        head = _KEYS.get(k)
        if head is None:
            if len(_KEYS) > 4096:
                _KEYS.clear()
            head = _KEYS[k] = json.dumps(k) + ": ["
        parts.append(f"{head}{pair[0]}, {pair[1]}]")
    return "{" + ", ".join(parts) + "}"


def journal_rows(list outcomes, list new, list items, dict balance, list ids, list stamps,
                 now, one_us, enc_deltas, list results, record, settle_result):
    """The journal rows, accumulator additions and account movements of a batch's new
    settlements, in the batch's order (``SqlLedger.settle_batch``, which reads the state
    and writes what this returns).

    ``outcomes[i]``: the evaluation of item ``i`` (an ``Outcome``, an exception or None),
    looked at where ``new[i]``; ``balance``: member id -> (account balance, last movement
    seq), updated as accounts pay; ``ids`` and ``stamps``: the new settlements' ids and
    encoded times, one each, in order; ``now``: the time before the first, each 1 µs
    (``one_us``) later than the one before. Fills ``results[i]`` with the item's
    ``settle_result(record(...), True)``, its exception or None. Returns ``(rows, added,
    moves)``: journal rows in ``SETTLEMENT_COLS`` order, ``{(member, year, layer): [paid,
    base]}``, account movement rows."""
    cdef list rows = [], moves = []
    cdef dict added = {}
    cdef Py_ssize_t i, j = 0, n = len(outcomes)
    cdef list a
    for i in range(n):
        if not new[i]:
            continue
        out = outcomes[i]
        if out is None or isinstance(out, BaseException):
            results[i] = out
            continue
        facility_id, request_id, request_hash, member_id, year = items[i][:5]
        bal, seq = balance[member_id]
        deltas = check_outcome(out, bal)
        now = now + one_us                 # the journal keeps the batch's order
        sid, stamp = ids[j], stamps[j]
        j += 1
        paid = out.account_paid_fen
        result = out.result
        if type(result) is not bytes:
            result = bytes(result)
        rows.append((sid, facility_id, request_id, request_hash, member_id, year, "SETTLED",
                     enc_deltas(deltas), paid, out.chain_deductible_after_fen,
                     out.policy_version, result, out.fund_total_fen, stamp, None))
        for layer, pair in deltas.items():
            key = (member_id, year, layer)
            a = added.get(key)
            if a is None:
                added[key] = [pair[0], pair[1]]
            else:
                a[0] += pair[0]
                a[1] += pair[1]
        if paid:
            bal -= paid
            seq += 1
            moves.append((member_id, seq, "SETTLE", -paid, sid, bal, stamp))
            balance[member_id] = (bal, seq)
        results[i] = settle_result(tuple.__new__(record, (
            sid, facility_id, request_id, request_hash, member_id, year, "SETTLED", deltas,
            paid, out.chain_deductible_after_fen, out.policy_version, result,
            out.fund_total_fen, now, None)), True)
    return rows, added, moves
