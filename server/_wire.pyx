# cython: language_level=3
"""The batch RPCs' wire path in C: protobuf columns in, claim rows, protobuf columns out.

``decode_batch`` reads a serialized ``SettleBatchRequest`` (the ``ClaimColumns`` form) straight
into int64 arrays, without a Python object per claim; ``build_rows`` validates every claim and
makes the kernel's claim rows (engine/_kernel.pxd) from the columns and small per-member and
per-facility tables; ``gather_results`` reads the kernel's output rows back into result columns
and ``packed``/``strings`` encode columns as protobuf fields. ``server.batch`` is the Python
side; ``tests/test_batch.py`` holds this module to upb's parser and serializer.

Only the protobuf wire format is assumed (varints, length-delimited fields, packed or unpacked
repeated scalars, unknown fields skipped), never a particular encoder's choices.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
import array as _array

from engine._kernel cimport (
    C_SIZE, C_FACTS, C_KIND, C_LEVEL, C_MONTH, C_MONTHS, C_DAY, C_REFERRED_DAY, C_TOTAL,
    C_FULL_SELFPAY, C_OVER_LIMIT, C_PRE_SELFPAY, C_CHAIN, C_REFERRAL, C_USE_ACCOUNT, C_BALANCE,
    O_STATUS, O_IN_SCOPE, O_DEDUCTIBLE, O_FUND_TOTAL, O_PATIENT_TOTAL, O_ACCOUNT_PAID, O_CASH,
    O_BALANCE_AFTER, O_CHAIN_AFTER, O_APPLIED, O_LAYERS, NO_VALUE,
)
from server._pb cimport (
    fund_order, id_ok, ordinal, put_breakdown, put_bytes, put_date, put_field_varint, put_key,
    put_request_tail, put_settlement_tail, put_sub, put_totals, put_varint, read_varint,
    skip_field, varint_size, ymd_ordinal,
)
from engine.claims import MAX_FEN as _MAX_FEN
from engine.kernel import zeros as _zeros

cdef int64_t MAX_FEN = _MAX_FEN
MEMO_MAX = 20_000             # member_table's memo is dropped when it grows past this

# ClaimColumns field numbers of the int columns, in the order decode_batch returns them
INT_COLUMNS = ("member", "facility", "kind", "service_date", "total_fen", "full_selfpay_fen",
               "over_limit_fen", "pre_selfpay_fen", "flags", "referred_by_primary_on")
cdef int N_INT = 10

# per-claim refusal codes of build_rows (server.batch turns them into ItemErrors)
cpdef enum:
    E_OK = 0
    E_MEMBER_INDEX = 1
    E_FACILITY_INDEX = 2
    E_KIND = 3
    E_DATE = 4
    E_TOTAL = 5
    E_FULL_SELFPAY = 6
    E_OVER_LIMIT = 7
    E_PRE_SELFPAY = 8
    E_IN_SCOPE = 9
    E_FLAGS = 10
    E_INPATIENT_FLAG = 11
    E_REFERRED_INPATIENT = 12
    E_REFERRED_DATE = 13
    E_MEMBER_UNKNOWN = 14
    E_FACILITY_UNKNOWN = 15
    E_BEFORE_BENEFIT = 16
    E_AFTER_BENEFIT = 17
    E_BEFORE_CONTINUOUS = 18
    E_NO_POLICY = 19
    E_REFUSED = 20          # refused before (per item, in Python): keep its error
    E_KERNEL = 100          # + the kernel's status


class WireError(ValueError):
    """The bytes are not a valid SettleBatchRequest."""


cdef struct Vec:
    int64_t* data
    Py_ssize_t n
    Py_ssize_t cap


cdef int vec_reserve(Vec* v, Py_ssize_t extra) except -1:
    cdef Py_ssize_t want = v.n + extra
    cdef int64_t* p
    if want <= v.cap:
        return 0
    if want < 2 * v.cap:
        want = 2 * v.cap
    if want < 16:
        want = 16
    p = <int64_t*> realloc(v.data, want * sizeof(int64_t))
    if p == NULL:
        raise MemoryError()
    v.data, v.cap = p, want
    return 0


cdef list _strings(list into, const unsigned char* b, Py_ssize_t start, Py_ssize_t length):
    into.append((<const char*> b + start)[:length].decode("utf-8"))
    return into


def decode_batch(const unsigned char[::1] data):
    """A serialized SettleBatchRequest -> (has_requests, member_ids, facility_ids,
    request_ids, int columns as array('q') in INT_COLUMNS order). ``WireError`` on bad bytes
    or a non-UTF-8 string."""
    cdef const unsigned char* b = &data[0] if data.shape[0] else NULL
    cdef Py_ssize_t end = data.shape[0], pos = 0, sub_end, pkt_end, k
    cdef uint64_t key, v, length
    cdef int field, wire, col
    cdef Vec vecs[10]
    cdef bint has_requests = False
    cdef list member_ids = [], facility_ids = [], request_ids = []
    for k in range(N_INT):
        vecs[k].data, vecs[k].n, vecs[k].cap = NULL, 0, 0
    try:
        while pos < end:
            if read_varint(b, end, &pos, &key):
                raise WireError("truncated field key")
            field, wire = <int> (key >> 3), <int> (key & 7)
            if field == 2 and wire == 2:
                has_requests = True
            if field != 1 or wire != 2:
                if skip_field(b, end, &pos, wire):
                    raise WireError(f"bad field {field}")
                continue
            if read_varint(b, end, &pos, &length) or length > <uint64_t> (end - pos):
                raise WireError("truncated claims")
            sub_end = pos + <Py_ssize_t> length
            while pos < sub_end:                      # one ClaimColumns (they concatenate)
                if read_varint(b, sub_end, &pos, &key):
                    raise WireError("truncated claims field key")
                field, wire = <int> (key >> 3), <int> (key & 7)
                if field in (1, 2, 13) and wire == 2:
                    if read_varint(b, sub_end, &pos, &length) or \
                            length > <uint64_t> (sub_end - pos):
                        raise WireError(f"truncated claims field {field}")
                    try:
                        _strings(member_ids if field == 1 else facility_ids if field == 2
                                 else request_ids, b, pos, <Py_ssize_t> length)
                    except UnicodeDecodeError:
                        raise WireError(f"claims field {field} is not UTF-8") from None
                    pos += <Py_ssize_t> length
                elif 3 <= field <= 12 and wire == 2:       # packed
                    col = field - 3
                    if read_varint(b, sub_end, &pos, &length) or \
                            length > <uint64_t> (sub_end - pos):
                        raise WireError(f"truncated claims field {field}")
                    pkt_end = pos + <Py_ssize_t> length
                    vec_reserve(&vecs[col], <Py_ssize_t> length)
                    while pos < pkt_end:
                        if read_varint(b, pkt_end, &pos, &v):
                            raise WireError(f"bad varint in claims field {field}")
                        vecs[col].data[vecs[col].n] = <int64_t> v
                        vecs[col].n += 1
                elif 3 <= field <= 12 and wire == 0:       # unpacked
                    col = field - 3
                    if read_varint(b, sub_end, &pos, &v):
                        raise WireError(f"bad varint in claims field {field}")
                    vec_reserve(&vecs[col], 1)
                    vecs[col].data[vecs[col].n] = <int64_t> v
                    vecs[col].n += 1
                elif skip_field(b, sub_end, &pos, wire):
                    raise WireError(f"bad claims field {field}")
        cols = []
        for k in range(N_INT):
            a = _zeros(vecs[k].n)
            if vecs[k].n:
                memcpy((<array.array> a).data.as_voidptr, vecs[k].data, 8 * vecs[k].n)
            cols.append(a)
        return has_requests, member_ids, facility_ids, request_ids, cols
    finally:
        for k in range(N_INT):
            free(vecs[k].data)


def date_ordinal(int64_t yyyymmdd):
    """For tests: the ordinal of a YYYYMMDD value, -1 if invalid."""
    return ymd_ordinal(yyyymmdd)


cdef inline int64_t col(const int64_t[::1] a, Py_ssize_t i) noexcept nogil:
    return a[i] if a.shape[0] else 0


cdef inline int64_t date_ord(object d):
    return ordinal(d.year, d.month, d.day)


def member_table(list members, dict fidx, dict regions, dict identity_bits, dict group_bits,
                 int64_t retired_bit, int64_t maternity_bit, int64_t[::1] ok, int64_t[::1] mask,
                 int64_t[::1] since, int64_t[::1] since_ym, int64_t[::1] bstart,
                 int64_t[::1] bend, int64_t[::1] primary, int64_t[::1] other,
                 int64_t[::1] region, int64_t[::1] balance, dict memo):
    """build_rows' per-member tables from MemberRecords (None: not registered): the facts
    mask (engine.kernel.member_facts), date ordinals (0: no benefit bound), the primary and
    other facility as indices of the batch's facility table (``fidx``, -1: none or not in
    it), the region as an index into ``regions`` (filled as new ones are met).

    ``memo`` keeps, by ``id(record)``, what a record gives whatever the batch (mask, dates,
    facilities, region, balance): records are immutable and the read cache hands out the same
    object until something is committed; an entry holds its record, so that id is not reused
    while it is there. The caller passes the same bit tables with the same memo."""
    cdef Py_ssize_t k
    cdef int64_t bits
    cdef tuple row
    if len(memo) > MEMO_MAX:
        memo.clear()
    for k in range(len(members)):
        m = members[k]
        if m is None:
            continue
        got = memo.get(id(m))
        if got is None or (<tuple> got)[0] is not m:
            bits = identity_bits.get(m.identity, 0)
            for g in m.groups:
                bits |= <int64_t> group_bits[g]
            if m.retired:
                bits |= retired_bit
            if m.maternity_eligible:
                bits |= maternity_bit
            d = m.continuous_since
            b0 = m.benefit_start
            b1 = m.benefit_end
            got = memo[id(m)] = (
                m, bits, date_ord(d), <int64_t> d.year * 12 + <int64_t> d.month,
                date_ord(b0) if b0 is not None else 0, date_ord(b1) if b1 is not None else 0,
                m.primary_facility, m.other_facility, m.region, m.account_balance_fen)
        row = <tuple> got
        ok[k] = 1
        mask[k] = <int64_t> row[1]
        since[k] = <int64_t> row[2]
        since_ym[k] = <int64_t> row[3]
        bstart[k] = <int64_t> row[4]
        bend[k] = <int64_t> row[5]
        f = row[6]
        primary[k] = fidx.get(f, -1) if f else -1
        f = row[7]
        other[k] = fidx.get(f, -1) if f else -1
        r = row[8]
        got = regions.get(r)
        if got is None:
            got = regions[r] = len(regions)
        region[k] = got
        balance[k] = <int64_t> row[9]


def first_bad_id(list ids, Py_ssize_t max_len):
    """The index of the first id that convert.check_id refuses (empty, longer than
    ``max_len``, not printable, or with leading or trailing white space), or -1."""
    cdef Py_ssize_t k
    for k in range(len(ids)):
        if not id_ok(ids[k], max_len):
            return k
    return -1


def build_rows(Py_ssize_t n, list cols, const int64_t[::1] chain, const int64_t[::1] referral,
               const int64_t[::1] m_ok, const int64_t[::1] m_mask, const int64_t[::1] m_since,
               const int64_t[::1] m_bstart, const int64_t[::1] m_bend,
               const int64_t[::1] m_primary, const int64_t[::1] m_other,
               const int64_t[::1] m_region, const int64_t[::1] f_ok, const int64_t[::1] f_level,
               const int64_t[::1] level_bits, const int64_t[::1] flag_bits,
               const int64_t[::1] r_start, const int64_t[::1] r_count,
               const int64_t[::1] b_from, const int64_t[::1] b_policy,
               int64_t[::1] codes, int64_t[::1] rows, int64_t[::1] policy, int64_t[::1] year):
    """Validate each claim and write its kernel row, or its refusal code (``codes[i]`` not 0:
    kept if already set). ``flag_bits``: the fact bits of HOME_BED_AFTER_TRANSFER,
    OUT_OF_AREA_UNFILED, CHILDBIRTH, PRIMARY_FACILITY, OTHER_FACILITY. Members' ``m_since`` is
    the ordinal of continuous_since, ``m_bstart``/``m_bend`` of the benefit period (0: none).
    Per region ``r``, policies start at ``b_from[r_start[r] + k]`` (ordinals, ascending) and
    are ``b_policy[...]``. ``year`` gets each claim's service year."""
    cdef const int64_t[::1] c_member = cols[0], c_facility = cols[1], c_kind = cols[2]
    cdef const int64_t[::1] c_date = cols[3], c_total = cols[4], c_fsp = cols[5]
    cdef const int64_t[::1] c_olim = cols[6], c_psp = cols[7], c_flags = cols[8]
    cdef const int64_t[::1] c_ref = cols[9]
    cdef Py_ssize_t i, mi, fi, nm = m_ok.shape[0], nf = f_ok.shape[0], k, r0, rc
    cdef int64_t kind, day, y, mo, d, total, fsp, olim, psp, flags, ref, refo, facts, since
    cdef int64_t pol, ch
    cdef int64_t* row
    with nogil:
        for i in range(n):
            if codes[i]:
                continue
            mi = c_member[i]
            if mi < 0 or mi >= nm:
                codes[i] = E_MEMBER_INDEX
                continue
            fi = c_facility[i]
            if fi < 0 or fi >= nf:
                codes[i] = E_FACILITY_INDEX
                continue
            kind = c_kind[i]
            if kind != 1 and kind != 2:             # CLAIM_KIND_INPATIENT, _OUTPATIENT
                codes[i] = E_KIND
                continue
            day = ymd_ordinal(c_date[i])
            if day < 0:
                codes[i] = E_DATE
                continue
            ref = col(c_ref, i)
            refo = 0
            if ref != 0:
                refo = ymd_ordinal(ref)
                if refo < 0:
                    codes[i] = E_REFERRED_DATE
                    continue
            total, fsp, olim, psp = c_total[i], col(c_fsp, i), col(c_olim, i), col(c_psp, i)
            if not 0 <= total <= MAX_FEN:
                codes[i] = E_TOTAL
                continue
            if not 0 <= fsp <= MAX_FEN:
                codes[i] = E_FULL_SELFPAY
                continue
            if not 0 <= olim <= MAX_FEN:
                codes[i] = E_OVER_LIMIT
                continue
            if not 0 <= psp <= MAX_FEN:
                codes[i] = E_PRE_SELFPAY
                continue
            if total - fsp - olim - psp < 0:
                codes[i] = E_IN_SCOPE
                continue
            flags = col(c_flags, i)
            if flags & ~15:
                codes[i] = E_FLAGS
                continue
            ch = col(referral, i)
            if kind == 2 and (flags & 14 or ch):
                codes[i] = E_INPATIENT_FLAG
                continue
            if kind == 1 and ref != 0:
                codes[i] = E_REFERRED_INPATIENT
                continue
            if not f_ok[fi]:
                codes[i] = E_FACILITY_UNKNOWN
                continue
            if not m_ok[mi]:
                codes[i] = E_MEMBER_UNKNOWN
                continue
            if m_bstart[mi] and day < m_bstart[mi]:
                codes[i] = E_BEFORE_BENEFIT
                continue
            if m_bend[mi] and day > m_bend[mi]:
                codes[i] = E_AFTER_BENEFIT
                continue
            since = m_since[mi]
            if day < since:
                codes[i] = E_BEFORE_CONTINUOUS
                continue
            # the policy in force: the last of the region's that starts on or before the day
            r0, rc = r_start[m_region[mi]], r_count[m_region[mi]]
            pol = -1
            for k in range(rc):
                if b_from[r0 + k] <= day:
                    pol = b_policy[r0 + k]
                else:
                    break
            if pol < 0:
                codes[i] = E_NO_POLICY
                continue
            policy[i] = pol
            y = c_date[i] // 10000
            mo = c_date[i] // 100 % 100
            year[i] = y
            facts = m_mask[mi] | level_bits[f_level[fi]]
            if flags & 2:
                facts |= flag_bits[0]
            if flags & 4:
                facts |= flag_bits[1]
            if flags & 8:
                facts |= flag_bits[2]
            if m_primary[mi] == fi:
                facts |= flag_bits[3]
            elif m_other[mi] == fi:
                facts |= flag_bits[4]
            row = &rows[i * C_SIZE]
            row[C_FACTS] = facts
            row[C_KIND] = 0 if kind == 1 else 1     # model.CLAIM_KINDS order
            row[C_LEVEL] = f_level[fi]
            row[C_MONTH] = mo
            row[C_MONTHS] = 0                       # set_months fills it in
            row[C_DAY] = day
            row[C_REFERRED_DAY] = refo
            row[C_TOTAL] = total
            row[C_FULL_SELFPAY] = fsp
            row[C_OVER_LIMIT] = olim
            row[C_PRE_SELFPAY] = psp
            row[C_CHAIN] = col(chain, i)
            row[C_REFERRAL] = ch
            row[C_USE_ACCOUNT] = flags & 1
            row[C_BALANCE] = 0
    return 0


def set_months(Py_ssize_t n, const int64_t[::1] member, const int64_t[::1] m_since_ym,
               const int64_t[::1] codes, int64_t[::1] rows, const int64_t[::1] service_date):
    """C_MONTHS of every accepted claim: (year * 12 + month) of the day minus that of
    continuous_since, plus 1 (二(四)4, as reference.continuous_months)."""
    cdef Py_ssize_t i
    cdef int64_t v
    with nogil:
        for i in range(n):
            if codes[i] == 0:
                v = service_date[i]
                rows[i * C_SIZE + C_MONTHS] = (v // 10000) * 12 + v // 100 % 100 \
                    - m_since_ym[member[i]] + 1
    return 0


def assign_slots(Py_ssize_t n, const int64_t[::1] member, const int64_t[::1] year,
                 const int64_t[::1] codes, int64_t min_year, int64_t n_years,
                 int64_t[::1] slots, int64_t[::1] used):
    """slot = member * n_years + (year - min_year) for accepted claims, -1 otherwise;
    ``used[slot]`` set to 1 for the slots in use."""
    cdef Py_ssize_t i
    cdef int64_t s
    with nogil:
        for i in range(n):
            if codes[i]:
                slots[i] = -1
            else:
                s = member[i] * n_years + (year[i] - min_year)
                slots[i] = s
                used[s] = 1
    return 0


def gather_results(Py_ssize_t n, const int64_t[::1] out, Py_ssize_t osz,
                   int64_t[::1] codes, const int64_t[::1] policy,
                   const int64_t[::1] pol_nlayers, const int64_t[::1] pol_offset,
                   Py_ssize_t base_code):
    """The result columns of a settled batch from the kernel's output rows (stride ``osz``).

    A claim whose code is 0 but whose O_STATUS is not ST_OK gets ``base_code`` + status.
    Returns (values: 8 arrays in SettlementColumns order in_scope .. chain_after,
    layer_count, layer, layer_amount, layer_cap) as array('q')."""
    cdef Py_ssize_t i, l, nl, m = 0, total_layers = 0
    cdef const int64_t* o
    cdef int64_t applied, cap
    vals = [_zeros(n) for _ in range(8)]
    cdef int64_t[::1] v0 = vals[0], v1 = vals[1], v2 = vals[2], v3 = vals[3]
    cdef int64_t[::1] v4 = vals[4], v5 = vals[5], v6 = vals[6], v7 = vals[7]
    counts = _zeros(n)
    cdef int64_t[::1] cnt = counts
    for i in range(n):
        if codes[i] == 0:
            o = &out[i * osz]
            if o[O_STATUS] != 0:
                codes[i] = base_code + o[O_STATUS]
                continue
            applied = o[O_APPLIED]
            while applied:
                total_layers += applied & 1
                applied >>= 1
    layer = _zeros(total_layers)
    amount = _zeros(total_layers)
    capr = _zeros(total_layers)
    cdef int64_t[::1] ly = layer, am = amount, cp = capr
    with nogil:
        for i in range(n):
            if codes[i]:
                continue
            o = &out[i * osz]
            v0[i] = o[O_IN_SCOPE]
            v1[i] = o[O_DEDUCTIBLE]
            v2[i] = o[O_FUND_TOTAL]
            v3[i] = o[O_PATIENT_TOTAL]
            v4[i] = o[O_ACCOUNT_PAID]
            v5[i] = o[O_CASH]
            v6[i] = o[O_BALANCE_AFTER]
            v7[i] = o[O_CHAIN_AFTER]
            applied = o[O_APPLIED]
            nl = pol_nlayers[policy[i]]
            for l in range(nl):
                if applied >> l & 1:
                    ly[m] = pol_offset[policy[i]] + l
                    am[m] = o[O_LAYERS + 2 * l]
                    cap = o[O_LAYERS + 2 * l + 1]
                    cp[m] = -1 if cap == NO_VALUE else cap
                    m += 1
                    cnt[i] += 1
    return vals, counts, layer, amount, capr


def packed(int field, const int64_t[::1] values):
    """A packed repeated varint field (int64, int32, uint32, bool, enum) as bytes; b"" when
    empty (proto3 leaves empty repeated fields out). Written straight into the bytes object."""
    cdef Py_ssize_t n = values.shape[0], i, size = 0, head
    cdef unsigned char tmp[20]
    cdef unsigned char* p
    if n == 0:
        return b""
    with nogil:
        for i in range(n):
            size += varint_size(<uint64_t> values[i])
    head = put_varint(tmp, (<uint64_t> field << 3) | 2)
    head += put_varint(tmp + head, <uint64_t> size)
    out = PyBytes_FromStringAndSize(NULL, head + size)
    p = <unsigned char*> PyBytes_AS_STRING(out)
    memcpy(p, tmp, head)
    p += head
    with nogil:
        for i in range(n):
            p += put_varint(p, <uint64_t> values[i])
    return out


def strings(int field, list values):
    """A repeated string field as bytes."""
    cdef list parts = []
    cdef unsigned char tmp[20]
    cdef Py_ssize_t k
    cdef bytes data
    key = (field << 3) | 2
    for s in values:
        data = s.encode("utf-8")
        k = put_varint(tmp, key)
        k += put_varint(tmp + k, len(data))
        parts.append((<char*> tmp)[:k])
        parts.append(data)
    return b"".join(parts)


def length_delimited(int field, bytes data):
    cdef unsigned char tmp[20]
    cdef Py_ssize_t k = put_varint(tmp, (field << 3) | 2)
    k += put_varint(tmp + k, len(data))
    return (<char*> tmp)[:k] + data


def validate_claims(Py_ssize_t n, list cols, const int64_t[::1] referral, Py_ssize_t nm,
                    Py_ssize_t nf, int64_t[::1] codes):
    """The checks of build_rows that need no registry: indices, kind, dates, amounts, flags
    (the order and codes of build_rows). Claims with a code already set are left alone."""
    cdef const int64_t[::1] c_member = cols[0], c_facility = cols[1], c_kind = cols[2]
    cdef const int64_t[::1] c_date = cols[3], c_total = cols[4], c_fsp = cols[5]
    cdef const int64_t[::1] c_olim = cols[6], c_psp = cols[7], c_flags = cols[8]
    cdef const int64_t[::1] c_ref = cols[9]
    cdef Py_ssize_t i
    cdef int64_t kind, ref, total, fsp, olim, psp, flags
    with nogil:
        for i in range(n):
            if codes[i]:
                continue
            if c_member[i] < 0 or c_member[i] >= nm:
                codes[i] = E_MEMBER_INDEX
            elif c_facility[i] < 0 or c_facility[i] >= nf:
                codes[i] = E_FACILITY_INDEX
            elif c_kind[i] != 1 and c_kind[i] != 2:
                codes[i] = E_KIND
            elif ymd_ordinal(c_date[i]) < 0:
                codes[i] = E_DATE
            else:
                ref = col(c_ref, i)
                kind = c_kind[i]
                total, fsp, olim, psp = c_total[i], col(c_fsp, i), col(c_olim, i), col(c_psp, i)
                flags = col(c_flags, i)
                if ref != 0 and ymd_ordinal(ref) < 0:
                    codes[i] = E_REFERRED_DATE
                elif not 0 <= total <= MAX_FEN:
                    codes[i] = E_TOTAL
                elif not 0 <= fsp <= MAX_FEN:
                    codes[i] = E_FULL_SELFPAY
                elif not 0 <= olim <= MAX_FEN:
                    codes[i] = E_OVER_LIMIT
                elif not 0 <= psp <= MAX_FEN:
                    codes[i] = E_PRE_SELFPAY
                elif total - fsp - olim - psp < 0:
                    codes[i] = E_IN_SCOPE
                elif flags & ~15:
                    codes[i] = E_FLAGS
                elif kind == 2 and (flags & 14 or col(referral, i)):
                    codes[i] = E_INPATIENT_FLAG
                elif kind == 1 and ref != 0:
                    codes[i] = E_REFERRED_INPATIENT
    return 0


def request_digests(Py_ssize_t n, list cols, list member_ids, list facility_ids,
                    list request_ids, const int64_t[::1] codes):
    """Per claim whose code is 0, ``server.convert.request_hash`` of the SettleRequest it
    stands for (the deterministic encoding: fields in number order, defaults left out, the
    service date and the amounts always present), built here without a message object;
    None for the others."""
    import hashlib
    sha256 = hashlib.sha256
    cdef const int64_t[::1] c_member = cols[0], c_facility = cols[1], c_kind = cols[2]
    cdef const int64_t[::1] c_date = cols[3], c_total = cols[4], c_fsp = cols[5]
    cdef const int64_t[::1] c_olim = cols[6], c_psp = cols[7], c_flags = cols[8]
    cdef const int64_t[::1] c_ref = cols[9]
    cdef unsigned char fixed[256]
    cdef Py_ssize_t i, k
    cdef list out = [None] * n
    ids_m = [s.encode("utf-8") for s in member_ids]
    ids_f = [s.encode("utf-8") for s in facility_ids]
    cdef bytes rid, mid, fid
    for i in range(n):
        if codes[i]:
            continue
        rid = request_ids[i].encode("utf-8")
        mid = ids_m[c_member[i]]
        fid = ids_f[c_facility[i]]
        head = b""
        if rid:
            head += length_delimited(1, rid)
        if mid:
            head += length_delimited(2, mid)
        if fid:
            head += length_delimited(3, fid)
        k = put_request_tail(fixed, c_kind[i], c_date[i], c_total[i], col(c_fsp, i),
                             col(c_olim, i), col(c_psp, i), col(c_flags, i), col(c_ref, i))
        out[i] = sha256(head + (<char*> fixed)[:k]).hexdigest()
    return out


cdef enum:
    MAX_PLAN_LAYERS = 64


def stored_settlements(Py_ssize_t n, list cols, const int64_t[::1] out, Py_ssize_t osz,
                       const int64_t[::1] codes, const int64_t[::1] policy,
                       const int64_t[::1] select, list plans,
                       list request_ids, list member_ids, list facility_ids,
                       const int64_t[::1] m_identity, outcome):
    """The ledger ``Outcome`` of every claim settled (code 0, kernel status 0) with
    ``select[i]`` set, from the kernel's output rows, None for the others. Its stored
    ``Settlement`` is what ``server.batch.outcome`` builds as a message, encoded as upb
    encodes it (fields in number order, proto3 defaults left out, service_date and breakdown
    always present, cap_remaining_fen present when the layer has a cap); its deltas are
    {layer id: (amount, added)} for the layers that paid or counted something. ``plans[p]``:
    (version, layers, layer ids), ``layers`` a list of (layer_id, Fund enum, fund code) as
    UTF-8 bytes and int. ``outcome``: the ``Outcome`` named tuple class, made here as a tuple
    of its fields (a Python call per claim was a millisecond per 1000)."""
    cdef const int64_t[::1] c_member = cols[0], c_facility = cols[1], c_kind = cols[2]
    cdef const int64_t[::1] c_date = cols[3], c_total = cols[4], c_fsp = cols[5]
    cdef const int64_t[::1] c_olim = cols[6], c_psp = cols[7], c_flags = cols[8]
    cdef Py_ssize_t i, li, nl, k, b, j, size, cap_size = 0, n_codes, nf
    cdef const int64_t* o
    cdef int64_t applied, amount, cap, added
    cdef unsigned char* sub = NULL
    cdef unsigned char* buf = NULL
    cdef Py_ssize_t sub_size = 64
    cdef int code_of[MAX_PLAN_LAYERS]
    cdef int first[MAX_PLAN_LAYERS]
    cdef int64_t fund_amount[MAX_PLAN_LAYERS]
    cdef list got = [None] * n
    cdef bytes rid, mid, fid, version, lid_b, code_b
    ids_m = [x.encode("utf-8") for x in member_ids]
    ids_f = [x.encode("utf-8") for x in facility_ids]
    # per plan: version, layers, the fund-code index of each layer, the distinct codes
    prepared = []
    for version_s, layers, lids in plans:
        fund_codes = []
        index = []
        for lid_b, fund, code_b in layers:
            if code_b not in fund_codes:
                fund_codes.append(code_b)
            index.append(fund_codes.index(code_b))
            sub_size = max(sub_size, 64 + len(lid_b) + len(code_b))
        if len(layers) > MAX_PLAN_LAYERS:
            raise ValueError(f"a policy of more than {MAX_PLAN_LAYERS} layers")
        prepared.append((version_s.encode("utf-8"), layers, lids, index, fund_codes,
                         version_s))
    sub = <unsigned char*> malloc(sub_size)
    if sub == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            o = &out[i * osz]
            if not select[i] or codes[i] or o[O_STATUS]:
                continue
            version, layers, lids, index, fund_codes, version_s = prepared[policy[i]]
            nl = len(layers)
            n_codes = len(fund_codes)
            rid = request_ids[i].encode("utf-8") if request_ids else b""
            mid = ids_m[c_member[i]]
            fid = ids_f[c_facility[i]]
            size = len(rid) + len(mid) + len(fid) + len(version) + 400
            for li in range(nl):
                size += 60 + len(layers[li][0]) + 2 * len(layers[li][2])
            if size > cap_size:
                free(buf)
                buf = <unsigned char*> malloc(size)
                if buf == NULL:
                    raise MemoryError()
                cap_size = size
            k = put_bytes(buf, 2, rid, len(rid))
            k += put_bytes(buf + k, 3, mid, len(mid))
            k += put_bytes(buf + k, 4, fid, len(fid))
            k += put_field_varint(buf + k, 5, c_kind[i])
            k += put_date(buf + k, 6, c_date[i])
            k += put_breakdown(buf + k, c_total[i], col(c_fsp, i), col(c_olim, i),
                               col(c_psp, i), o[O_IN_SCOPE], o[O_DEDUCTIBLE])
            applied = o[O_APPLIED]
            d = {}
            for li in range(nl):
                code_of[li] = index[li]
                amount = o[O_LAYERS + 2 * li]
                added = o[O_LAYERS + 2 * nl + li]
                if (applied >> li) & 1 and (amount or added):
                    d[lids[li]] = (amount, added)
            nf = fund_order(&o[O_LAYERS], applied, nl, code_of, n_codes, first, fund_amount)
            for j in range(nf):
                _, fund, code_b = layers[first[j]]
                b = put_field_varint(sub, 1, fund)
                b += put_bytes(sub + b, 2, code_b, len(code_b))
                b += put_field_varint(sub + b, 3, fund_amount[j])
                k += put_sub(buf + k, 9, sub, b)
            # layers (10): every applied layer, in the policy's order
            for li in range(nl):
                if not (applied >> li) & 1:
                    continue
                lid_b, fund, code_b = layers[li]
                b = put_bytes(sub, 1, lid_b, len(lid_b))
                b += put_field_varint(sub + b, 2, fund)
                b += put_bytes(sub + b, 3, code_b, len(code_b))
                b += put_field_varint(sub + b, 4, o[O_LAYERS + 2 * li])
                cap = o[O_LAYERS + 2 * li + 1]
                if cap != NO_VALUE:
                    b += put_key(sub + b, 5, 0)
                    b += put_varint(sub + b, <uint64_t> cap)
                k += put_sub(buf + k, 10, sub, b)
            k += put_totals(buf + k, o[O_FUND_TOTAL], o[O_PATIENT_TOTAL], o[O_ACCOUNT_PAID],
                            o[O_CASH], o[O_BALANCE_AFTER])
            k += put_settlement_tail(buf + k, version, len(version), o[O_CHAIN_AFTER],
                                     m_identity[c_member[i]], (col(c_flags, i) >> 3) & 1)
            got[i] = tuple.__new__(outcome, (d, o[O_ACCOUNT_PAID], o[O_CHAIN_AFTER],
                                             version_s, (<char*> buf)[:k], o[O_FUND_TOTAL]))
    finally:
        free(buf)
        free(sub)
    return got


def nonzero(const int64_t[::1] a):
    """The indices of ``a``'s nonzero values, in order (a batch's refused claims are few)."""
    cdef Py_ssize_t i
    return [i for i in range(a.shape[0]) if a[i] != 0]


def year_range(const int64_t[::1] year, const int64_t[::1] codes):
    """(lowest, highest) service year of the accepted claims, or None when there are none."""
    cdef Py_ssize_t i, n = year.shape[0]
    cdef int64_t lo = 0, hi = 0
    cdef bint any_ok = False
    with nogil:
        for i in range(n):
            if codes[i] == 0:
                if not any_ok or year[i] < lo:
                    lo = year[i]
                if not any_ok or year[i] > hi:
                    hi = year[i]
                any_ok = True
    return (lo, hi) if any_ok else None
