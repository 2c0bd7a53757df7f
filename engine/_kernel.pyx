# cython: language_level=3
"""The settlement kernel: engine/reference.py over flat int64 arrays, agreeing to the fen.

The policy comes in as one packed int64 program (engine.kernel.compile_policy; the layout is in
_kernel.pxd), a claim as one int64 row, a member-year's accumulators as (paid, base) per layer.
``settle_core`` reads and writes only C arrays, so it runs without the GIL; ``settle_one`` is the
single-claim entry over preallocated ``array('q')`` buffers, ``settle_batch`` runs many claims in
order over member-year state slots. Section markers (§3.1 …) are those of the spec
shared/spec/jiangmen-2018.md and of the reference's methods.
"""
from libc.stdint cimport int64_t
from cpython cimport array
from cpython.object cimport Py_SIZE

from engine.claims import MAX_FEN as _MAX_FEN

# Bill amounts are at most MAX_FEN (1e12) and every rate at most 10000 bp, so a product
# amount x rate (<= 1e16) and its doubling in round_half_up stay far inside int64.
cdef int64_t MAX_FEN = _MAX_FEN
# Policy amounts (caps, deductibles, thresholds, allowances, band edges) are at most this, so
# cap x scale and threshold x share (<= 1e18) stay inside int64.
POLICY_MAX_FEN = 10 ** 14
cdef int64_t POLICY_MAX = POLICY_MAX_FEN
# Accumulators and balances beyond +-2^62 are refused: sums with a claim cannot overflow.
STATE_LIMIT = 2 ** 62
cdef int64_t STATE_MAX = STATE_LIMIT
cdef int64_t BP = 10_000


cdef inline int64_t imax(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


cdef inline int64_t imin(int64_t a, int64_t b) noexcept nogil:
    return a if a < b else b


cdef inline int64_t round_half_up(int64_t numerator, int64_t denominator) noexcept nogil:
    # engine.money.round_half_up. Every numerator here is >= 0 (amounts and rates are), where
    # C's truncating division equals Python's floor division; the one exception, a negative
    # in-scope amount in §4, is clamped to 0 by its caller whichever way it rounds.
    return (2 * numerator + denominator) // (2 * denominator)


cdef inline int64_t adjusted_rate(const int64_t* p, const int64_t* lay, int64_t facts,
                                  int64_t rate) noexcept nogil:
    """The rate effects of a layer's adjustments whose facts hold, in policy order."""
    cdef const int64_t* a = p + p[H_ADJ] + lay[L_ADJ_START] * A_SIZE
    cdef int64_t i, has
    for i in range(lay[L_ADJ_COUNT]):
        if a[A_WHEN] & ~facts == 0:
            has = a[A_HAS]
            if has & HAS_RATE:
                rate = a[A_RATE]
            if has & HAS_RATE_DELTA:
                rate = imin(BP, imax(0, rate + a[A_RATE_DELTA]))
            if has & HAS_DIVISOR:
                rate = rate // a[A_DIVISOR]
        a += A_SIZE
    return rate


cdef inline int fail(int64_t* o, int status) noexcept nogil:
    o[O_STATUS] = status
    return status


cdef int settle_core(const int64_t* p, const int64_t* c, int64_t balance, int64_t* st,
                     int64_t* o) noexcept nogil:
    """Settle one claim: fill the output row ``o``; on success add the claim to ``st``.

    The twin of reference.settle (its _Run methods are named at each branch). ``st`` is only
    written at the end, so a refused claim leaves the accumulators as they were.
    """
    cdef int64_t nl = p[H_NLAYERS]
    cdef int64_t total = c[C_TOTAL], fsp = c[C_FULL_SELFPAY], olim = c[C_OVER_LIMIT]
    cdef int64_t psp = c[C_PRE_SELFPAY], chain = c[C_CHAIN]
    cdef int64_t kind = c[C_KIND], level = c[C_LEVEL], month = c[C_MONTH], months = c[C_MONTHS]
    cdef int64_t facts, day, referred, scale, in_scope, deductible = 0, paid = 0, applied = 0
    cdef int64_t l, i, nb, remaining, due, rate, ded, cap, cap_left, amount, least
    cdef int64_t threshold, start, end, lo, hi, numerator, share, limit, patient, account
    cdef int64_t added_base[MAX_LAYERS]
    cdef const int64_t* lay
    cdef const int64_t* a
    cdef const int64_t* r
    cdef const int64_t* b
    cdef const int64_t* s
    cdef int64_t* ol

    # boundary checks that keep every product below inside int64
    if not (0 <= total <= MAX_FEN and 0 <= fsp <= MAX_FEN and 0 <= olim <= MAX_FEN
            and 0 <= psp <= MAX_FEN):
        return fail(o, ST_AMOUNT_RANGE)
    if not c[C_REFERRAL]:
        chain = 0                   # only a referral continues a chain (reference.settle)
    elif not 0 <= chain <= MAX_FEN:
        return fail(o, ST_AMOUNT_RANGE)
    if not (-STATE_MAX <= balance <= STATE_MAX):
        return fail(o, ST_STATE_RANGE)
    if not (0 <= kind <= 1 and 0 <= level <= 3 and 1 <= month <= 12):
        return fail(o, ST_BAD_CODE)
    if months < 1:
        return fail(o, ST_BAD_MONTHS)

    # claim_facts: REFERRAL from the flag; REFERRED_BY_PRIMARY within the window 二(四)2(3)
    facts = c[C_FACTS] & ~(p[H_BIT_REFERRED] | p[H_BIT_REFERRAL])
    if c[C_REFERRAL]:
        facts |= p[H_BIT_REFERRAL]
    day = c[C_DAY]
    referred = c[C_REFERRED_DAY]
    if referred != 0 and day - p[H_WINDOW] <= referred <= day:
        facts |= p[H_BIT_REFERRED]

    # cap_scale_bp 二(四)4: the first step covering the continuous months (the last is open)
    s = p + p[H_SCALE]
    scale = BP
    for i in range(p[H_NSCALE]):
        if s[S_UPTO] == NO_VALUE or months <= s[S_UPTO]:
            scale = s[S_SCALE]
            break
        s += S_SIZE

    in_scope = total - fsp - olim - psp                                         # spec §2
    for l in range(nl):
        lay = p + p[H_LAYERS] + l * L_SIZE
        ol = o + O_LAYERS + 2 * l
        ol[0] = 0
        ol[1] = NO_VALUE
        o[O_LAYERS + 2 * nl + l] = 0    # base delta (marginal layers), set below
        if lay[L_CLAIM_KIND] != kind or lay[L_WHEN] & ~facts != 0:
            continue
        if not (-STATE_MAX <= st[2 * l] <= STATE_MAX and -STATE_MAX <= st[2 * l + 1] <= STATE_MAX):
            return fail(o, ST_STATE_RANGE)
        remaining = imax(0, in_scope - deductible - paid)   # _Run.remaining: never negative
        cap_left = NO_VALUE

        if lay[L_KIND] == K_DEDUCTIBLE_RATE:                                    # §3.1
            due = lay[L_DED + level]
            rate = lay[L_RATE + level]
            a = p + p[H_ADJ] + lay[L_ADJ_START] * A_SIZE
            for i in range(lay[L_ADJ_COUNT]):   # in the order the policy lists them
                if a[A_WHEN] & ~facts == 0:
                    if a[A_HAS] & HAS_DED:
                        due = a[A_DED]
                    if a[A_HAS] & HAS_DED_DELTA:
                        due = imax(0, due + a[A_DED_DELTA])
                    if a[A_HAS] & HAS_RATE:
                        rate = a[A_RATE]
                    if a[A_HAS] & HAS_RATE_DELTA:
                        rate = imin(BP, imax(0, rate + a[A_RATE_DELTA]))
                    if a[A_HAS] & HAS_DIVISOR:
                        rate = rate // a[A_DIVISOR]
                a += A_SIZE
            if lay[L_CHAIN] and c[C_REFERRAL]:
                due = imax(0, due - chain)      # 二(四)3: top up to the higher deductible
            ded = imin(remaining, due)
            if lay[L_CAP] != NO_VALUE:
                cap = lay[L_CAP]
                if lay[L_CAP_SCALED]:
                    cap = cap * scale // BP     # 二(四)4: exact, as in the reference
                cap_left = imax(0, cap - st[2 * l])
            amount = round_half_up((remaining - ded) * rate, BP)
            if cap_left != NO_VALUE and amount > cap_left:
                amount = cap_left
            if lay[L_FLOOR] != NO_VALUE and lay[L_FLOOR_WHEN] & ~facts == 0:
                # 二(四)1(1) childbirth floor, never above the base or the cap left
                least = imin(lay[L_FLOOR], remaining)
                if cap_left != NO_VALUE:
                    least = imin(least, cap_left)
                if amount < least:
                    amount = least
            deductible += ded

        elif lay[L_KIND] == K_MARGINAL_BANDS:                                   # §3.2, §3.3
            # the first row with no groups or a group of the member's
            r = p + p[H_ROWS] + lay[L_ROW_START] * R_SIZE
            for i in range(lay[L_ROW_COUNT]):
                if r[R_GROUPS] == 0 or r[R_GROUPS] & facts != 0:
                    break
                r += R_SIZE
            else:
                return fail(o, ST_NO_ROW)
            threshold = lay[L_THRESHOLD]
            if r[R_SHARE] != NO_VALUE:
                threshold = threshold * r[R_SHARE] // BP    # exact: whole yuan x whole percent
            start = st[2 * l + 1]
            end = start + remaining
            b = p + p[H_BANDS] + r[R_BAND_START] * B_SIZE
            nb = r[R_BAND_COUNT]
            numerator = 0
            for i in range(nb):
                lo = imax(imax(b[B_FROM], threshold), start)
                hi = imin(b[B_SIZE + B_FROM], end) if i + 1 < nb else end
                if hi > lo:
                    numerator += (hi - lo) * adjusted_rate(p, lay, facts, b[B_RATE])
                b += B_SIZE
            amount = round_half_up(numerator, BP)   # once per layer, never per band
            if r[R_CAP] != NO_VALUE:
                cap = r[R_CAP]
                if r[R_CAP_SCALED]:
                    cap = cap * scale // BP
                cap_left = imax(0, cap - st[2 * l])
                if amount > cap_left:
                    amount = cap_left
            added_base[l] = remaining   # the whole base, even when the cap cuts the payment

        else:                                                                   # §4
            rate = adjusted_rate(p, lay, facts, lay[L_RATE])
            share = imax(0, round_half_up(in_scope * rate, BP) - paid)
            limit = lay[L_ALLOWANCE] * month if lay[L_MONTHLY] else lay[L_ALLOWANCE]
            cap_left = imax(0, limit - st[2 * l])   # monthly: carried over within the year
            amount = imin(share, cap_left)

        paid += amount
        applied |= (<int64_t> 1) << l
        ol[0] = amount
        ol[1] = cap_left

    # §5 totals
    patient = total - paid
    account = imin(balance, patient) if c[C_USE_ACCOUNT] else 0
    o[O_STATUS] = ST_OK
    o[O_IN_SCOPE] = in_scope
    o[O_DEDUCTIBLE] = deductible
    o[O_FUND_TOTAL] = paid
    o[O_PATIENT_TOTAL] = patient
    o[O_ACCOUNT_PAID] = account
    o[O_CASH] = patient - account
    o[O_BALANCE_AFTER] = balance - account
    o[O_CHAIN_AFTER] = chain + deductible
    o[O_APPLIED] = applied
    for l in range(nl):   # commit the accumulators
        if applied >> l & 1:
            st[2 * l] += o[O_LAYERS + 2 * l]
            if p[p[H_LAYERS] + l * L_SIZE + L_KIND] == K_MARGINAL_BANDS:
                st[2 * l + 1] += added_base[l]
                o[O_LAYERS + 2 * nl + l] = added_base[l]
    return ST_OK


cdef class CompiledKernel:
    """A packed policy program, checked once so the kernel never reads out of its bounds."""

    def __cinit__(self, program):
        cdef array.array prog = array.array("q", program)  # a private copy
        self.program = prog
        _validate(prog)
        self.p = <const int64_t*> prog.data.as_voidptr
        self.n_layers = self.p[H_NLAYERS]
        self.state_size = 2 * self.n_layers
        self.out_size = O_LAYERS + 3 * self.n_layers


def _validate(array.array prog):
    n = len(prog)

    def need(ok, what):
        if not ok:
            raise ValueError(f"bad kernel program: {what}")

    def amount(v, what, none_ok=False):
        if none_ok and v == NO_VALUE:
            return
        if not 0 <= v <= POLICY_MAX_FEN:
            raise OverflowError(f"kernel program: {what} = {v} is outside 0..{POLICY_MAX_FEN}")

    def table(off, count, size, what):
        need(count >= 0 and H_HEADER_SIZE <= off and off + count * size <= n, f"{what} table")

    need(n >= H_HEADER_SIZE and prog[H_VERSION] == LAYOUT_VERSION, "header or version")
    need(prog[H_SIZE] == n, "size")
    nl, nadj, nrows, nbands = prog[H_NLAYERS], prog[H_NADJ], prog[H_NROWS], prog[H_NBANDS]
    need(0 <= nl <= MAX_LAYERS, f"at most {MAX_LAYERS} layers")
    table(prog[H_LAYERS], nl, L_SIZE, "layer")
    table(prog[H_ADJ], nadj, A_SIZE, "adjustment")
    table(prog[H_ROWS], nrows, R_SIZE, "row")
    table(prog[H_BANDS], nbands, B_SIZE, "band")
    table(prog[H_SCALE], prog[H_NSCALE], S_SIZE, "scale")
    need(prog[H_NSCALE] >= 1, "scale steps")
    amount(prog[H_WINDOW], "referral window")
    for h in (H_BIT_REFERRED, H_BIT_REFERRAL):
        need(prog[h] > 0 and prog[h] & (prog[h] - 1) == 0, "fact bit")
    for i in range(prog[H_NSCALE]):
        at = prog[H_SCALE] + i * S_SIZE
        last = i == prog[H_NSCALE] - 1
        need((prog[at + S_UPTO] == NO_VALUE) == last, "only the last scale step is open")
        need(0 <= prog[at + S_SCALE] <= BP, "scale bp")
    for i in range(nadj):
        at = prog[H_ADJ] + i * A_SIZE
        need(0 <= prog[at + A_HAS] < 32, "adjustment effects")
        amount(prog[at + A_DED], "adjustment deductible")
        amount(abs(prog[at + A_DED_DELTA]), "adjustment deductible change")
        need(0 <= prog[at + A_RATE] <= BP, "adjustment rate")
        need(-BP <= prog[at + A_RATE_DELTA] <= BP, "adjustment rate change")
        need(prog[at + A_DIVISOR] >= 1, "adjustment divisor")
    for i in range(nbands):
        at = prog[H_BANDS] + i * B_SIZE
        amount(prog[at + B_FROM], "band edge")
        need(0 <= prog[at + B_RATE] <= BP, "band rate")
    for i in range(nrows):
        at = prog[H_ROWS] + i * R_SIZE
        need(prog[at + R_SHARE] == NO_VALUE or 0 <= prog[at + R_SHARE] <= BP, "row share")
        amount(prog[at + R_CAP], "row cap", True)
        need(prog[at + R_BAND_COUNT] >= 1 and 0 <= prog[at + R_BAND_START]
             and prog[at + R_BAND_START] + prog[at + R_BAND_COUNT] <= nbands, "row bands")
    for i in range(nl):
        at = prog[H_LAYERS] + i * L_SIZE
        kind = prog[at + L_KIND]
        need(kind in (K_DEDUCTIBLE_RATE, K_MARGINAL_BANDS, K_ALLOWANCE_RATE), "layer kind")
        need(prog[at + L_CLAIM_KIND] in (0, 1), "layer claim kind")
        need(0 <= prog[at + L_ADJ_START] and prog[at + L_ADJ_COUNT] >= 0
             and prog[at + L_ADJ_START] + prog[at + L_ADJ_COUNT] <= nadj, "layer adjustments")
        for k in range(4):
            amount(prog[at + L_DED + k], "layer deductible")
            need(0 <= prog[at + L_RATE + k] <= BP, "layer rate")
        amount(prog[at + L_CAP], "layer cap", True)
        amount(prog[at + L_FLOOR], "layer floor", True)
        amount(prog[at + L_THRESHOLD], "layer threshold")
        amount(prog[at + L_ALLOWANCE], "layer allowance")
        if kind == K_MARGINAL_BANDS:
            need(prog[at + L_ROW_COUNT] >= 1 and 0 <= prog[at + L_ROW_START]
                 and prog[at + L_ROW_START] + prog[at + L_ROW_COUNT] <= nrows, "layer rows")


cdef inline int64_t* _buffer(array.array a, Py_ssize_t size, str name) except NULL:
    if a.ob_descr.typecode_char != b"q" or Py_SIZE(a) < size:
        raise ValueError(f"{name} must be array('q') of at least {size} items")
    return <int64_t*> a.data.as_voidptr


def settle_one(CompiledKernel kernel not None, array.array claim not None,
               array.array state not None, array.array out not None):
    """Settle one claim row (C_SIZE items) into ``out`` (kernel.out_size items), adding it to
    ``state`` (kernel.state_size items: paid, base per layer). Returns the status (ST_OK = 0)."""
    cdef const int64_t* c = _buffer(claim, C_SIZE, "claim")
    cdef int64_t* st = _buffer(state, kernel.state_size, "state")
    cdef int64_t* o = _buffer(out, kernel.out_size, "out")
    return settle_core(kernel.p, c, c[C_BALANCE], st, o)


def settle_row(CompiledKernel kernel not None, tuple claim not None,
               array.array state not None, array.array out not None):
    """settle_one with the claim row as a tuple of C_SIZE ints: the adapter's path, which
    saves building an array per call."""
    cdef int64_t c[C_SIZE]
    cdef Py_ssize_t i
    cdef int64_t* st = _buffer(state, kernel.state_size, "state")
    cdef int64_t* o = _buffer(out, kernel.out_size, "out")
    if len(claim) != C_SIZE:
        raise ValueError(f"claim must have {C_SIZE} items, got {len(claim)}")
    for i in range(C_SIZE):
        c[i] = claim[i]
    return settle_core(kernel.p, c, c[C_BALANCE], st, o)


def settle_batch(CompiledKernel kernel not None, const int64_t[::1] claims,
                 const int64_t[::1] slots, int64_t[::1] state, int64_t[::1] balances,
                 int64_t[::1] out, const int64_t[::1] accounts=None):
    """Settle ``len(slots)`` claims in order, without the GIL.

    ``claims``: n rows of C_SIZE. ``slots[i]``: the member-year row of ``state`` (n_slots rows
    of kernel.state_size) claim i reads and updates. ``balances``: personal-account balances,
    indexed by ``accounts[i]`` or, without ``accounts``, by the slot. ``out``: n rows of
    kernel.out_size. A refused claim gets its status in O_STATUS and changes nothing.
    Returns the number of refused claims.
    """
    cdef Py_ssize_t n = slots.shape[0], i, slot, acct, errors = 0
    cdef Py_ssize_t ssz = kernel.state_size, osz = kernel.out_size
    cdef Py_ssize_t n_slots = state.shape[0] // ssz if ssz else 0
    cdef Py_ssize_t n_bal = balances.shape[0]
    cdef bint by_account = accounts is not None
    cdef const int64_t* p = kernel.p
    cdef int64_t no_state = 0     # a policy without layers has no state to point at
    cdef int64_t* st
    cdef int64_t* o
    if claims.shape[0] != n * C_SIZE:
        raise ValueError(f"claims must hold {n} rows of {C_SIZE}, got {claims.shape[0]} items")
    if out.shape[0] < n * osz:
        raise ValueError(f"out must hold {n} rows of {osz}")
    if ssz and state.shape[0] % ssz:
        raise ValueError(f"state must be rows of {ssz}")
    if by_account and accounts.shape[0] != n:
        raise ValueError("accounts must have one index per claim")
    with nogil:
        for i in range(n):
            slot = slots[i]
            acct = accounts[i] if by_account else slot
            o = &out[i * osz]
            if slot < 0 or (ssz and slot >= n_slots) or not 0 <= acct < n_bal:
                o[O_STATUS] = ST_BAD_SLOT
                errors += 1
                continue
            st = &state[slot * ssz] if ssz else &no_state
            if settle_core(p, &claims[i * C_SIZE], balances[acct], st, o) == ST_OK:
                balances[acct] = o[O_BALANCE_AFTER]
            else:
                errors += 1
    return errors
