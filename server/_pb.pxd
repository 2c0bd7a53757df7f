# The protobuf wire format and calendar arithmetic in C, shared by the Cython codecs
# (server/_wire.pyx: the batch RPCs; server/_single.pyx: the single-claim calls). Inline
# functions only: each module compiles its own copy. Only the wire format is assumed (varints,
# length-delimited fields, fields in any order), never a particular encoder's choices.
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy


# --- reading ----------------------------------------------------------------------------------

cdef inline int read_varint(const unsigned char* b, Py_ssize_t end, Py_ssize_t* pos,
                            uint64_t* out) noexcept nogil:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef unsigned char c
    while pos[0] < end:
        c = b[pos[0]]
        pos[0] += 1
        if shift < 64:
            v |= (<uint64_t> (c & 0x7F)) << shift
        shift += 7
        if not (c & 0x80):
            out[0] = v
            return 0
        if shift >= 70:
            return -1
    return -1


cdef inline int skip_field(const unsigned char* b, Py_ssize_t end, Py_ssize_t* pos,
                    int wire) noexcept nogil:
    cdef uint64_t v
    if wire == 0:
        return read_varint(b, end, pos, &v)
    if wire == 1:
        pos[0] += 8
    elif wire == 5:
        pos[0] += 4
    elif wire == 2:
        if read_varint(b, end, pos, &v) or v > <uint64_t> (end - pos[0]):
            return -1
        pos[0] += <Py_ssize_t> v
    else:
        return -1
    return 0 if pos[0] <= end else -1


# --- dates ----------------------------------------------------------------------------------

cdef inline bint is_leap(int64_t y) noexcept nogil:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


cdef inline int64_t month_days(int64_t y, int64_t m) noexcept nogil:
    if m == 2:
        return 29 if is_leap(y) else 28
    if m == 4 or m == 6 or m == 9 or m == 11:
        return 30
    return 31


cdef inline int64_t ordinal(int64_t y, int64_t m, int64_t d) noexcept nogil:
    """date(y, m, d).toordinal() (days_from_civil + 719163)."""
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468 + 719163


cdef inline int64_t ymd_ordinal(int64_t v) noexcept nogil:
    """YYYYMMDD as a date ordinal, or -1 when it is no valid date of years 1..9999."""
    cdef int64_t y = v // 10000, m = v // 100 % 100, d = v % 100
    if v < 0 or not (1 <= y <= 9999 and 1 <= m <= 12 and 1 <= d <= month_days(y, m)):
        return -1
    return ordinal(y, m, d)


# --- writing ----------------------------------------------------------------------------------

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


cdef inline Py_ssize_t put_varint(unsigned char* p, uint64_t v) noexcept nogil:
    cdef Py_ssize_t k = 0
    if v < 0x80:                 # most values of a result column: one byte
        p[0] = <unsigned char> v
        return 1
    while v > 0x7F:
        p[k] = <unsigned char> ((v & 0x7F) | 0x80)
        v >>= 7
        k += 1
    p[k] = <unsigned char> v
    return k + 1


cdef inline Py_ssize_t varint_size(uint64_t v) noexcept nogil:
    # seven bits a byte: 1 + (the highest set bit) // 7
    return 1 + (63 - __builtin_clzll(v | 1)) // 7


cdef inline Py_ssize_t put_field_varint(unsigned char* p, int field, int64_t v) noexcept nogil:
    cdef Py_ssize_t k
    if v == 0:
        return 0
    k = put_varint(p, <uint64_t> (field << 3))
    return k + put_varint(p + k, <uint64_t> v)


cdef inline Py_ssize_t put_date(unsigned char* p, int field, int64_t v) noexcept nogil:
    """A Date submessage field from YYYYMMDD (every part set, as the wire requires)."""
    cdef unsigned char body[40]
    cdef Py_ssize_t k = 0, h
    k += put_field_varint(body + k, 1, v // 10000)
    k += put_field_varint(body + k, 2, v // 100 % 100)
    k += put_field_varint(body + k, 3, v % 100)
    h = put_varint(p, <uint64_t> ((field << 3) | 2))
    h += put_varint(p + h, <uint64_t> k)
    memcpy(p + h, body, k)
    return h + k


cdef inline Py_ssize_t put_key(unsigned char* p, int field, int wire) noexcept nogil:
    return put_varint(p, <uint64_t> ((field << 3) | wire))


cdef inline Py_ssize_t put_bytes(unsigned char* p, int field, const unsigned char* data,
                                 Py_ssize_t size) noexcept nogil:
    """A length-delimited field; nothing for an empty string (proto3's default)."""
    cdef Py_ssize_t k
    if size == 0:
        return 0
    k = put_key(p, field, 2)
    k += put_varint(p + k, <uint64_t> size)
    memcpy(p + k, data, size)
    return k + size


cdef inline Py_ssize_t put_sub(unsigned char* p, int field, const unsigned char* body,
                               Py_ssize_t size) noexcept nogil:
    """A submessage field, written even when empty (a message field that is set)."""
    cdef Py_ssize_t k = put_key(p, field, 2)
    k += put_varint(p + k, <uint64_t> size)
    memcpy(p + k, body, size)
    return k + size


cdef inline Py_ssize_t put_request_tail(unsigned char* p, int64_t kind, int64_t ymd,
                                        int64_t total, int64_t fsp, int64_t olim, int64_t psp,
                                        int64_t flags, int64_t referred) noexcept nogil:
    """A SettleRequest's fields after its ids (4-13) as its deterministic encoding writes them
    (``server.convert.request_hash``): kind, service date and the amounts always present, the
    flags as ``ClaimColumns.flags`` has them (1 use_personal_account, 2
    home_bed_after_transfer, 4 out_of_area_unfiled, 8 childbirth), ``referred`` the
    referred_by_primary_on date as YYYYMMDD (0: none). At most 160 bytes."""
    cdef unsigned char amounts[48]
    cdef Py_ssize_t k, a
    k = put_field_varint(p, 4, kind)
    k += put_date(p + k, 5, ymd)
    a = put_field_varint(amounts, 1, total)
    a += put_field_varint(amounts + a, 2, fsp)
    a += put_field_varint(amounts + a, 3, olim)
    a += put_field_varint(amounts + a, 4, psp)
    k += put_sub(p + k, 7, amounts, a)
    k += put_field_varint(p + k, 9, (flags >> 1) & 1)
    k += put_field_varint(p + k, 10, (flags >> 2) & 1)
    k += put_field_varint(p + k, 11, (flags >> 3) & 1)
    if referred:
        k += put_date(p + k, 12, referred)
    k += put_field_varint(p + k, 13, flags & 1)
    return k


# --- a Settlement's fields, as upb writes them (server._wire: batches; server._single) ------

cdef inline Py_ssize_t put_breakdown(unsigned char* p, int64_t total, int64_t fsp, int64_t olim,
                                     int64_t psp, int64_t in_scope,
                                     int64_t deductible) noexcept nogil:
    """The breakdown (field 8), present even when every amount is 0."""
    cdef unsigned char body[80]
    cdef Py_ssize_t b = put_field_varint(body, 1, total)
    b += put_field_varint(body + b, 2, fsp)
    b += put_field_varint(body + b, 3, olim)
    b += put_field_varint(body + b, 4, psp)
    b += put_field_varint(body + b, 5, in_scope)
    b += put_field_varint(body + b, 6, deductible)
    return put_sub(p, 8, body, b)


cdef inline int fund_order(const int64_t* layer_out, int64_t applied, int nl,
                           const int* code_of, int n_codes, int* first,
                           int64_t* amount) noexcept nogil:
    """The funds (field 9) of a settlement: one per fund code, in the order the paying layers
    first name it. ``layer_out[2 * i]`` is layer i's amount, ``code_of[i]`` its fund code's
    index (< ``n_codes``). Fills ``first[j]`` (the fund's first paying layer) and
    ``amount[j]`` (its total); returns how many funds. ``first`` and ``amount`` hold ``nl``."""
    cdef int i, j, nf = 0
    cdef int slot[64]          # code index -> fund, or -1 (a policy has at most 64 layers)
    cdef int64_t a
    for j in range(n_codes):
        slot[j] = -1
    for i in range(nl):
        a = layer_out[2 * i]
        if (applied >> i) & 1 and a:
            j = code_of[i]
            if slot[j] < 0:
                slot[j] = nf
                first[nf] = i
                amount[nf] = 0
                nf += 1
            amount[slot[j]] += a
    return nf


cdef inline Py_ssize_t put_totals(unsigned char* p, int64_t fund_total, int64_t patient_total,
                                  int64_t account_paid, int64_t cash,
                                  int64_t balance_after) noexcept nogil:
    """Fields 11-15."""
    cdef Py_ssize_t k = put_field_varint(p, 11, fund_total)
    k += put_field_varint(p + k, 12, patient_total)
    k += put_field_varint(p + k, 13, account_paid)
    k += put_field_varint(p + k, 14, cash)
    return k + put_field_varint(p + k, 15, balance_after)


cdef inline Py_ssize_t put_settlement_tail(unsigned char* p, const unsigned char* version,
                                           Py_ssize_t n_version, int64_t chain_after,
                                           int64_t identity, bint childbirth) noexcept nogil:
    """Fields 17-21: policy version, chain deductible after, identity, childbirth."""
    cdef Py_ssize_t k = put_bytes(p, 17, version, n_version)
    k += put_field_varint(p + k, 19, chain_after)
    k += put_field_varint(p + k, 20, identity)
    return k + put_field_varint(p + k, 21, 1 if childbirth else 0)


# --- ids --------------------------------------------------------------------------------------

cdef inline bint id_ok(str v, Py_ssize_t max_len):
    """Whether ``server.convert.check_id`` takes the (non-empty) id: at most ``max_len``
    characters, printable, without leading or trailing white space."""
    cdef Py_ssize_t n = len(v)
    cdef Py_UCS4 ch
    if n == 0 or n > max_len or v[0].isspace() or v[n - 1].isspace():
        return False
    for ch in v:
        if not ch.isprintable():
            return False
    return True
