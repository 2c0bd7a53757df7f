# cython: language_level=3
"""The single-claim calls' wire path in C: a ``SettleRequest``'s bytes in, the
``SettleResponse``'s bytes out, no protobuf object in between.

``parse_settle`` reads a serialized ``SettleRequest`` of the fast path's kind: its bill the
pre-aggregated amounts (what hospital systems send at checkout), no referral chain, no
primary-facility referral date, no trace, every value one that ``server.convert`` accepts.
It returns None for any other request, and the service answers that one by the general path,
which also words every refusal: the fast path never makes an error of its own.
``request_digest`` is the request's idempotency digest. ``settle`` runs the kernel
(engine/_kernel.pxd) on the claim row and encodes the reply as upb encodes the message
``server.fastpath.settle`` builds (fields in number order, proto3 defaults left out, optional
fields present when set). ``server.fastpath`` is the Python side (``pre_settle_wire``,
``settle_wire``); tests/test_single.py holds all of it to the general path.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.datetime cimport date_new, import_datetime
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8

from engine._kernel cimport (
    CompiledKernel, settle_core, MAX_LAYERS, NO_VALUE,
    C_SIZE, C_FACTS, C_KIND, C_LEVEL, C_MONTH, C_MONTHS, C_DAY, C_REFERRED_DAY, C_TOTAL,
    C_FULL_SELFPAY, C_OVER_LIMIT, C_PRE_SELFPAY, C_CHAIN, C_REFERRAL, C_USE_ACCOUNT, C_BALANCE,
    O_IN_SCOPE, O_DEDUCTIBLE, O_FUND_TOTAL, O_PATIENT_TOTAL, O_ACCOUNT_PAID, O_CASH,
    O_BALANCE_AFTER, O_CHAIN_AFTER, O_APPLIED, O_LAYERS,
)
from server._pb cimport (
    fund_order, id_ok, ordinal, put_breakdown, put_bytes, put_date, put_field_varint, put_key,
    put_request_tail, put_settlement_tail, put_sub, put_totals, put_varint, read_varint,
    ymd_ordinal,
)
from hashlib import sha256 as _sha256

from engine.claims import MAX_FEN as _MAX_FEN
from engine import kernel as _kernel
from server.convert import MAX_ID_LEN as _MAX_ID_LEN

import_datetime()

cdef int64_t MAX_FEN = _MAX_FEN
cdef Py_ssize_t MAX_ID = _MAX_ID_LEN
# the claim's own fact bits (engine.kernel.row_of) and the kernel's kind index by wire kind
cdef int64_t HOME_BED = _kernel._HOME_BED
cdef int64_t OUT_OF_AREA = _kernel._OUT_OF_AREA
cdef int64_t CHILDBIRTH = _kernel._CHILDBIRTH
cdef int64_t KIND_INDEX[3]
KIND_INDEX[0] = -1
KIND_INDEX[1] = _kernel._KIND["INPATIENT"]    # ty.CLAIM_KIND_INPATIENT
KIND_INDEX[2] = _kernel._KIND["OUTPATIENT"]   # ty.CLAIM_KIND_OUTPATIENT

# parse_settle's flags: bit 0 use_personal_account, then the inpatient-only flags (as the
# batch's ClaimColumns.flags)
cpdef enum:
    F_USE_ACCOUNT = 1
    F_HOME_BED = 2
    F_OUT_OF_AREA = 4
    F_CHILDBIRTH = 8

cdef enum:
    PRE_SETTLED = 1        # ty.SETTLEMENT_STATUS_PRE_SETTLED
    STACK_BYTES = 8192


# --- reading a SettleRequest ---------------------------------------------------------------------

cdef int read_date(const unsigned char* b, Py_ssize_t end, Py_ssize_t pos,
                   int64_t* ymd) noexcept nogil:
    """A ``Date`` submessage in b[pos:end] as YYYYMMDD; -1 unless it is a valid date."""
    cdef uint64_t key, v
    cdef int64_t part[4]
    part[1] = part[2] = part[3] = 0
    while pos < end:
        if read_varint(b, end, &pos, &key) or key & 7 != 0 or not 1 <= key >> 3 <= 3:
            return -1
        if read_varint(b, end, &pos, &v) or v > 9999:
            return -1
        part[key >> 3] = <int64_t> v
    ymd[0] = part[1] * 10000 + part[2] * 100 + part[3]
    return 0 if ymd_ordinal(ymd[0]) >= 0 else -1


cdef int read_amounts(const unsigned char* b, Py_ssize_t end, Py_ssize_t pos,
                      int64_t* amount) noexcept nogil:
    """A ``BillAmounts`` submessage into amount[0..3]; -1 unless every amount is within
    0..MAX_FEN and the three self-pay parts do not exceed the total (convert._bill)."""
    cdef uint64_t key, v
    amount[0] = amount[1] = amount[2] = amount[3] = 0
    while pos < end:
        if read_varint(b, end, &pos, &key) or key & 7 != 0 or not 1 <= key >> 3 <= 4:
            return -1
        if read_varint(b, end, &pos, &v) or v > <uint64_t> MAX_FEN:
            return -1
        amount[(key >> 3) - 1] = <int64_t> v
    return 0 if amount[0] - amount[1] - amount[2] - amount[3] >= 0 else -1


cdef str read_id(const unsigned char* b, Py_ssize_t start, Py_ssize_t length):
    """A string field that check_id takes, or None (not UTF-8, or refused)."""
    cdef str s
    try:
        s = PyUnicode_DecodeUTF8(<const char*> b + start, length, NULL)
    except UnicodeDecodeError:
        return None
    return s if id_ok(s, MAX_ID) else None


def parse_settle(const unsigned char[::1] data):
    """``(request_id, member_id, facility_id, kind, service_date, total_fen,
    full_selfpay_fen, over_limit_fen, pre_selfpay_fen, flags)`` of a serialized
    ``SettleRequest`` of the fast path's kind (the module docstring), with ``kind`` the wire
    enum, ``service_date`` a ``date``, ``flags`` the F_* bits; None for any other request,
    valid or not. ``request_id`` may be empty (PreSettle does not require it)."""
    cdef Py_ssize_t end = data.shape[0], pos = 0, length
    cdef Py_ssize_t span[3][2]
    cdef const unsigned char* b
    cdef uint64_t key, v
    cdef int field, wire, k
    cdef int64_t kind = 0, ymd = 0, flags = 0
    cdef int64_t amount[4]
    cdef bint has_date = False, has_amounts = False, trace = False
    if end == 0:
        return None
    b = &data[0]
    for k in range(3):
        span[k][0] = span[k][1] = 0
    while pos < end:
        if read_varint(b, end, &pos, &key):
            return None
        field, wire = <int> (key >> 3), <int> (key & 7)
        if wire == 2:
            if read_varint(b, end, &pos, &v) or v > <uint64_t> (end - pos):
                return None
            length = <Py_ssize_t> v
            if 1 <= field <= 3:              # request_id, member_id, facility_id
                span[field - 1][0], span[field - 1][1] = pos, length
            elif field == 5 and not has_date:     # service_date (a repeated one merges)
                if read_date(b, pos + length, pos, &ymd):
                    return None
                has_date = True
            elif field == 7 and not has_amounts:  # amounts
                if read_amounts(b, pos + length, pos, amount):
                    return None
                has_amounts = True
            else:    # line items, a referral, referred_by_primary_on, unknown fields
                return None
            pos += length
        elif wire == 0:
            if read_varint(b, end, &pos, &v):
                return None
            if field == 4:
                kind = <int64_t> v
            elif field == 9:
                flags = (flags | F_HOME_BED) if v else (flags & ~F_HOME_BED)
            elif field == 10:
                flags = (flags | F_OUT_OF_AREA) if v else (flags & ~F_OUT_OF_AREA)
            elif field == 11:
                flags = (flags | F_CHILDBIRTH) if v else (flags & ~F_CHILDBIRTH)
            elif field == 13:
                flags = (flags | F_USE_ACCOUNT) if v else (flags & ~F_USE_ACCOUNT)
            elif field == 14:                # want_trace (the last one counts, as in upb)
                trace = v != 0
            else:
                return None
        else:
            return None
    if trace:                                # the reference evaluator's
        return None
    # convert.validate_settle: a known kind, a date, the amounts, inpatient-only flags
    if not (kind == 1 or kind == 2) or not has_date or not has_amounts:
        return None
    if kind == 2 and flags & (F_HOME_BED | F_OUT_OF_AREA | F_CHILDBIRTH):
        return None
    if span[1][1] == 0 or span[2][1] == 0:
        return None
    ids = []
    for k in range(3):
        if span[k][1] == 0:
            ids.append("")
            continue
        s = read_id(b, span[k][0], span[k][1])
        if s is None:
            return None
        ids.append(s)
    return (ids[0], ids[1], ids[2], kind,
            date_new(<int> (ymd // 10000), <int> (ymd // 100 % 100), <int> (ymd % 100)),
            amount[0], amount[1], amount[2], amount[3], flags)


def request_digest(tuple req):
    """``server.convert.request_hash`` of the request ``parse_settle`` read as ``req``: the
    SHA-256 of its deterministic encoding, built without a message object."""
    cdef Py_ssize_t n_rid, n_mid, n_fid, k
    cdef const char* rid = PyUnicode_AsUTF8AndSize(req[0], &n_rid)
    cdef const char* mid = PyUnicode_AsUTF8AndSize(req[1], &n_mid)
    cdef const char* fid = PyUnicode_AsUTF8AndSize(req[2], &n_fid)
    cdef unsigned char p[2048]     # ids are at most MAX_ID characters, 4 bytes each
    day = req[4]
    if n_rid + n_mid + n_fid > 2048 - 180:
        raise ValueError("ids longer than parse_settle takes")
    k = put_bytes(p, 1, <const unsigned char*> rid, n_rid)
    k += put_bytes(p + k, 2, <const unsigned char*> mid, n_mid)
    k += put_bytes(p + k, 3, <const unsigned char*> fid, n_fid)
    k += put_request_tail(p + k, req[3], day.year * 10000 + day.month * 100 + day.day,
                          req[5], req[6], req[7], req[8], req[9], 0)
    return _sha256((<char*> p)[:k]).hexdigest()


# --- the policy's and a member's view, prepared --------------------------------------------------

cdef class WirePlan:
    """What the encoder needs of a compiled policy (``server.fastpath.Plan.wire``): per layer
    its id, the ``LayerPayment`` fields 1-3 and the ``FundPayment`` fields 1-2 of its fund,
    encoded, and the index of its fund code."""
    cdef CompiledKernel kernel
    cdef Py_ssize_t nl, n_codes, bound
    cdef list layer_ids, layer_heads, fund_heads
    cdef int code_of[MAX_LAYERS]
    cdef bytes version

    def __init__(self, CompiledKernel kernel not None, list layer_ids, list layer_heads,
                 list fund_heads, list code_index, str version):
        cdef Py_ssize_t i
        self.kernel = kernel
        self.nl = kernel.n_layers
        if not (len(layer_ids) == len(layer_heads) == len(fund_heads) == len(code_index)
                == self.nl):
            raise ValueError("one id, head and fund code per layer")
        self.layer_ids, self.layer_heads, self.fund_heads = layer_ids, layer_heads, fund_heads
        self.n_codes = 0
        for i in range(self.nl):
            if not 0 <= code_index[i] < self.nl:
                raise ValueError("a fund code index out of range")
            self.code_of[i] = code_index[i]
            self.n_codes = max(self.n_codes, code_index[i] + 1)
        self.version = version.encode("utf-8")
        self.bound = 2 * len(self.version)
        for i in range(self.nl):
            self.bound += len(layer_heads[i]) + len(fund_heads[i]) + 60


cdef enum:
    LIMIT_CAP = 0          # an annual cap, continuity-scaled when `scaled` (views._limit)
    LIMIT_YEARLY = 1       # a yearly allowance
    LIMIT_MONTHLY = 2      # a monthly allowance, to date


cdef struct Entry:
    int index              # the layer
    int limit_kind
    int64_t cap            # NO_VALUE: no limit
    int scaled
    int64_t threshold      # marginal_bands layers; NO_VALUE for the others
    int band_start, band_count


cdef class WireView:
    """A member's accumulators view of a policy (``server.fastpath.Plan.view_entries``, for
    one member-facts mask): per layer listed, its ``LayerAccumulator`` fields 1-4 encoded and
    how its limit and band are found."""
    cdef Entry* entries
    cdef int64_t* bands    # (from, rate) pairs
    cdef Py_ssize_t n, bound, layers   # layers: 1 + the highest layer index listed
    cdef list heads

    def __cinit__(self):
        self.entries, self.bands = NULL, NULL

    def __init__(self, list entries):
        """``entries``: (layer index, encoded head, limit kind, cap or None, scaled,
        threshold or None, bands ((from_fen, rate_bp), ...) or None), in the view's order."""
        cdef Py_ssize_t i, j, nb = 0
        self.n = len(entries)
        for e in entries:
            nb += len(e[6]) if e[6] is not None else 0
        self.entries = <Entry*> malloc(max(self.n, 1) * sizeof(Entry))
        self.bands = <int64_t*> malloc(max(2 * nb, 1) * sizeof(int64_t))
        if self.entries == NULL or self.bands == NULL:
            raise MemoryError()
        self.heads = []
        self.bound = self.layers = 0
        nb = 0
        for i, (index, head, kind, cap, scaled, threshold, bands) in enumerate(entries):
            if not 0 <= kind <= 2:
                raise ValueError(f"unknown limit kind {kind}")
            if not 0 <= index < MAX_LAYERS:
                raise ValueError(f"layer index {index} out of range")
            self.layers = max(self.layers, index + 1)
            self.heads.append(head)
            self.bound += len(head) + 80
            self.entries[i].index = index
            self.entries[i].limit_kind = kind
            self.entries[i].cap = NO_VALUE if cap is None else cap
            self.entries[i].scaled = 1 if scaled else 0
            self.entries[i].threshold = NO_VALUE if bands is None else threshold
            self.entries[i].band_start = nb
            self.entries[i].band_count = 0 if bands is None else len(bands)
            if bands is not None:
                if not bands:
                    raise ValueError("a marginal_bands row without bands")
                for j in range(len(bands)):
                    self.bands[2 * nb] = bands[j][0]
                    self.bands[2 * nb + 1] = bands[j][1]
                    nb += 1

    def __dealloc__(self):
        free(self.entries)
        free(self.bands)


# --- settling and encoding -------------------------------------------------------------------------

cdef inline Py_ssize_t put_headed(unsigned char* p, int field, bytes head,
                                  const unsigned char* tail, Py_ssize_t n):
    """A submessage field whose body is ``head`` (its first fields, encoded once by upb) and
    then tail[:n]."""
    cdef Py_ssize_t k = put_key(p, field, 2)
    k += put_varint(p + k, <uint64_t> (len(head) + n))
    memcpy(p + k, <const char*> head, len(head))
    k += len(head)
    memcpy(p + k, tail, n)
    return k + n


cdef Py_ssize_t put_view(unsigned char* p, WireView view, const int64_t* st, int64_t scale,
                         int64_t month):
    """The ``layers`` (field 4) of the accumulators view after the claim
    (fastpath.accumulators_message); -1 for a base below every band of its row."""
    cdef Py_ssize_t i, k = 0, b, j, n
    cdef Entry* e
    cdef int64_t paid, base, limit
    cdef const int64_t* band
    cdef bytes head
    cdef unsigned char sub[160]
    for i in range(view.n):
        e = &view.entries[i]
        head = view.heads[i]
        paid, base = st[2 * e.index], st[2 * e.index + 1]
        b = put_field_varint(sub, 5, paid)
        limit = NO_VALUE
        if e.limit_kind == LIMIT_CAP:
            if e.cap != NO_VALUE:
                limit = e.cap * scale // 10000 if e.scaled else e.cap
        elif e.limit_kind == LIMIT_YEARLY:
            limit = e.cap
        else:
            limit = e.cap * month
        if limit != NO_VALUE:
            b += put_key(sub + b, 6, 0)
            b += put_varint(sub + b, <uint64_t> limit)
            b += put_key(sub + b, 7, 0)
            b += put_varint(sub + b, <uint64_t> (limit - paid if limit > paid else 0))
        b += put_field_varint(sub + b, 8, base)
        if e.band_count:                  # views._band_position
            band = &view.bands[2 * e.band_start]
            b += put_key(sub + b, 9, 0)
            if base < e.threshold:
                b += put_varint(sub + b, 0)
                b += put_key(sub + b, 10, 0)
                b += put_varint(sub + b, <uint64_t> (e.threshold - base))
            else:
                j = -1                     # the last band starting at or below the base
                for n in range(e.band_count):
                    if band[2 * n] <= base:
                        j = n
                if j < 0:
                    return -1
                b += put_varint(sub + b, <uint64_t> band[2 * j + 1])
                if j + 1 < e.band_count:
                    b += put_key(sub + b, 10, 0)
                    b += put_varint(sub + b, <uint64_t> (band[2 * (j + 1)] - base))
        k += put_headed(p + k, 4, head, sub, b)
    return k


def settle(WirePlan plan not None, WireView view not None, tuple req, int64_t facts,
           int64_t level, int64_t months, int64_t scale, array.array state, int64_t balance,
           int64_t identity, bint pre):
    """The settlement of ``req`` (``parse_settle``'s tuple) over ``state`` (the member-year's
    accumulators as the kernel's (paid, base) pairs) for a member whose facts are ``facts``
    (member, facility level and primary/other facility bits; the claim's own flags are added
    here), with ``months`` of continuous contribution, the cap ``scale`` for them (bp), the
    account ``balance`` and the wire ``identity``.

    ``pre``: the encoded ``SettleResponse`` of a pre-settlement (status PRE_SETTLED). Else the
    ledger's outcome as (the encoded ``Settlement`` without id and status, the accumulator
    deltas {layer id: (paid, base)} of the applied layers that changed, account paid, chain
    deductible after, fund total). None when the kernel refuses the claim: the general path
    says why."""
    cdef str rid_s = req[0], mid_s = req[1], fid_s = req[2]
    cdef int64_t kind = req[3]
    day = req[4]
    cdef int64_t y = day.year, m = day.month, d = day.day
    cdef int64_t ymd = y * 10000 + m * 100 + d
    cdef int64_t flags = req[9]
    cdef int64_t c[C_SIZE]
    cdef int64_t st[2 * MAX_LAYERS]
    cdef int64_t before[2 * MAX_LAYERS]
    cdef int64_t o[O_LAYERS + 3 * MAX_LAYERS]
    cdef Py_ssize_t nl = plan.nl, i, j, k, a, b, size, acc_bound, n_rid, n_mid, n_fid
    cdef const char* rid = PyUnicode_AsUTF8AndSize(rid_s, &n_rid)
    cdef const char* mid = PyUnicode_AsUTF8AndSize(mid_s, &n_mid)
    cdef const char* fid = PyUnicode_AsUTF8AndSize(fid_s, &n_fid)
    cdef int64_t applied, cap
    cdef int first[MAX_LAYERS]
    cdef int64_t fund_amount[MAX_LAYERS]
    cdef int nf, status
    cdef unsigned char small[STACK_BYTES]
    cdef unsigned char* buf = small
    cdef unsigned char* acc
    cdef unsigned char* msg
    cdef unsigned char sub[32]
    cdef bytes head
    if not (kind == 1 or kind == 2):
        raise ValueError(f"unknown claim kind {kind}")
    if state.ob_descr.typecode_char != b"q" or len(state) != 2 * nl:
        raise ValueError(f"state must be array('q') of {2 * nl} values")
    if view.layers > nl:
        raise ValueError("a view of another policy")
    for i in range(2 * nl):
        st[i] = before[i] = state.data.as_longlongs[i]
    # engine.kernel.row_of
    if flags & F_HOME_BED:
        facts |= HOME_BED
    if flags & F_OUT_OF_AREA:
        facts |= OUT_OF_AREA
    if flags & F_CHILDBIRTH:
        facts |= CHILDBIRTH
    c[C_FACTS], c[C_KIND], c[C_LEVEL], c[C_MONTH] = facts, KIND_INDEX[kind], level, m
    c[C_MONTHS], c[C_DAY], c[C_REFERRED_DAY] = months, ordinal(y, m, d), 0
    c[C_TOTAL], c[C_FULL_SELFPAY], c[C_OVER_LIMIT], c[C_PRE_SELFPAY] = req[5], req[6], req[7], req[8]
    c[C_CHAIN], c[C_REFERRAL], c[C_USE_ACCOUNT], c[C_BALANCE] = 0, 0, flags & F_USE_ACCOUNT, balance
    status = settle_core(plan.kernel.p, c, balance, st, o)
    if status:
        return None
    # the accumulators view is written first (it is field 16 of the Settlement), then the
    # Settlement after it; each region holds the most its fields can take
    acc_bound = n_mid + len(plan.version) + view.bound + 120
    size = acc_bound + n_rid + n_mid + n_fid + acc_bound + plan.bound + 300
    if size > STACK_BYTES:
        buf = <unsigned char*> malloc(size)
        if buf == NULL:
            raise MemoryError()
    try:
        acc = buf
        a = put_bytes(acc, 1, <const unsigned char*> mid, n_mid)
        a += put_field_varint(acc + a, 2, y)
        a += put_date(acc + a, 3, ymd)
        b = put_view(acc + a, view, st, scale, m)
        if b < 0:
            return None
        a += b
        a += put_field_varint(acc + a, 5, o[O_BALANCE_AFTER])
        a += put_bytes(acc + a, 6, <const unsigned char*> plan.version, len(plan.version))
        a += put_field_varint(acc + a, 7, months)
        a += put_field_varint(acc + a, 8, scale)
        msg = buf + acc_bound
        k = put_bytes(msg, 2, <const unsigned char*> rid, n_rid)
        k += put_bytes(msg + k, 3, <const unsigned char*> mid, n_mid)
        k += put_bytes(msg + k, 4, <const unsigned char*> fid, n_fid)
        k += put_field_varint(msg + k, 5, kind)
        k += put_date(msg + k, 6, ymd)
        if pre:
            k += put_field_varint(msg + k, 7, PRE_SETTLED)
        k += put_breakdown(msg + k, req[5], req[6], req[7], req[8], o[O_IN_SCOPE],
                           o[O_DEDUCTIBLE])
        applied = o[O_APPLIED]
        nf = fund_order(&o[O_LAYERS], applied, nl, plan.code_of, plan.n_codes, first,
                        fund_amount)
        for j in range(nf):
            head = plan.fund_heads[first[j]]
            b = put_field_varint(sub, 3, fund_amount[j])
            k += put_headed(msg + k, 9, head, sub, b)
        # layers (10): every applied layer, in the policy's order
        for i in range(nl):
            if not (applied >> i) & 1:
                continue
            head = plan.layer_heads[i]
            b = put_field_varint(sub, 4, o[O_LAYERS + 2 * i])
            cap = o[O_LAYERS + 2 * i + 1]
            if cap != NO_VALUE:
                b += put_key(sub + b, 5, 0)
                b += put_varint(sub + b, <uint64_t> cap)
            k += put_headed(msg + k, 10, head, sub, b)
        k += put_totals(msg + k, o[O_FUND_TOTAL], o[O_PATIENT_TOTAL], o[O_ACCOUNT_PAID],
                        o[O_CASH], o[O_BALANCE_AFTER])
        k += put_sub(msg + k, 16, acc, a)
        k += put_settlement_tail(msg + k, <const unsigned char*> plan.version,
                                 len(plan.version), o[O_CHAIN_AFTER], identity,
                                 flags & F_CHILDBIRTH)
        if not pre:
            deltas = {}
            for i in range(nl):
                if (applied >> i) & 1 and (st[2 * i] != before[2 * i]
                                           or st[2 * i + 1] != before[2 * i + 1]):
                    deltas[plan.layer_ids[i]] = (st[2 * i] - before[2 * i],
                                                 st[2 * i + 1] - before[2 * i + 1])
            return ((<char*> msg)[:k], deltas, o[O_ACCOUNT_PAID], o[O_CHAIN_AFTER],
                    o[O_FUND_TOTAL])
        # SettleResponse {settlement = 1}
        b = put_key(sub, 1, 2)
        b += put_varint(sub + b, <uint64_t> k)
        out = PyBytes_FromStringAndSize(NULL, b + k)
        memcpy(PyBytes_AS_STRING(out), sub, b)
        memcpy(PyBytes_AS_STRING(out) + b, msg, k)
        return out
    finally:
        if buf != small:
            free(buf)


# --- a claim's context: its member, facility and year's accumulators, derived once ---------------

cdef int64_t _ymd(object d):
    return d.year * 10000 + d.month * 100 + d.day


cdef class ClaimContext:
    """What ``settle`` takes from a claim's member, facility and year's accumulators, derived
    from those records once (``server.fastpath.claim_context`` computes the facts): kept with
    the cached reads they came from, a PreSettle of the same member, facility and year
    derives none of it again. The days the member is covered on (``service.check_covered``:
    the benefit period and the contribution run) are kept as yyyymmdd bounds."""
    cdef readonly object member, facility, accumulators, region
    cdef readonly int64_t balance_fen, mask, facts, level, identity, since_month, year
    cdef int64_t first_ymd, last_ymd
    cdef object _plan, _view, _state

    def __init__(self, member, facility, accumulators, int64_t balance_fen, int64_t mask,
                 int64_t facts, int64_t level, int64_t identity):
        self.member, self.facility, self.accumulators = member, facility, accumulators
        self.region, self.year = member.region, accumulators.year
        self.balance_fen, self.mask, self.facts = balance_fen, mask, facts
        self.level, self.identity = level, identity
        since = member.continuous_since
        self.since_month = since.year * 12 + since.month - 1   # months counts its own month
        self.first_ymd = _ymd(since)
        if member.benefit_start is not None:
            self.first_ymd = max(self.first_ymd, _ymd(member.benefit_start))
        self.last_ymd = (_ymd(member.benefit_end) if member.benefit_end is not None
                         else 99999999)
        self._plan = None

    def settle(self, plan, tuple req, bint pre):
        """``settle`` of ``req`` in this context under ``plan`` (``server.fastpath.Plan``, the
        policy in force on the service day); None where the member is not covered then, or
        where the kernel refuses the claim."""
        day = req[4]
        cdef int64_t y = day.year, m = day.month
        cdef int64_t ymd = y * 10000 + m * 100 + day.day
        if not (self.first_ymd <= ymd <= self.last_ymd):
            return None
        if y != self.year:
            raise ValueError(f"accumulators of {self.year} given for a claim of {y}")
        if self._plan is plan:     # read together: no Python runs between these reads
            view, state = self._view, self._state
        else:
            view = plan.wire_view(self.mask)
            acc, cp = self.accumulators, plan.cp
            state = cp.state_of(acc) if acc.paid or acc.base else cp._zero_state
            # nor between these writes: a thread sees the three of one plan
            self._view, self._state, self._plan = view, state, plan
        cdef int64_t months = y * 12 + m - self.since_month
        scale = plan._scale.get(months)
        if scale is None:
            scale = plan.scale(months)
        return settle(plan.wire, view, req, self.facts, self.level, months, scale, state,
                      self.balance_fen, self.identity, pre)
