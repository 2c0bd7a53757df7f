# Declarations of the settlement kernel (engine/_kernel.pyx): the layout of the packed policy
# program, of a claim row and of an output row, all flat int64. engine/kernel.py packs and reads
# them through the same names, which the module exports as plain ints.
from libc.stdint cimport int64_t

cpdef enum:
    LAYOUT_VERSION = 1
    MAX_LAYERS = 62          # the applied-layer set is a bit mask in one int64
    NO_VALUE = -1            # "no cap", "no threshold share", "no floor": amounts are >= 0

    # program header
    H_VERSION = 0
    H_SIZE = 1               # total length of the program
    H_NLAYERS = 2
    H_LAYERS = 3             # offset of the layer table (n_layers x L_SIZE)
    H_ADJ = 4                # offset of the adjustment table (A_SIZE each)
    H_NADJ = 5
    H_ROWS = 6               # offset of the group-row table (R_SIZE each)
    H_NROWS = 7
    H_BANDS = 8              # offset of the band table (B_SIZE each)
    H_NBANDS = 9
    H_SCALE = 10             # offset of the continuity scale (S_SIZE each), last step open
    H_NSCALE = 11
    H_WINDOW = 12            # 二(四)2(3) referral window, days
    H_BIT_REFERRED = 13      # FACT_BIT["REFERRED_BY_PRIMARY"]
    H_BIT_REFERRAL = 14      # FACT_BIT["REFERRAL"]
    H_HEADER_SIZE = 15

    # layer kinds (policy.LAYER_KINDS order)
    K_DEDUCTIBLE_RATE = 0
    K_MARGINAL_BANDS = 1
    K_ALLOWANCE_RATE = 2

    # one layer
    L_KIND = 0
    L_CLAIM_KIND = 1         # index in model.CLAIM_KINDS
    L_WHEN = 2               # fact mask: all must hold
    L_ADJ_START = 3
    L_ADJ_COUNT = 4
    L_DED = 5                # deductible_rate: deductible by level (4 values, 0 when none)
    L_RATE = 9               # deductible_rate: rate by level (4); allowance_rate: L_RATE only
    L_CAP = 13               # deductible_rate: annual cap or NO_VALUE
    L_CAP_SCALED = 14
    L_CHAIN = 15             # deductible_rate: 1 when the referral chain deductible applies
    L_FLOOR_WHEN = 16        # deductible_rate: childbirth floor conditions
    L_FLOOR = 17             # deductible_rate: childbirth floor or NO_VALUE
    L_THRESHOLD = 18         # marginal_bands: threshold (0 when none)
    L_ROW_START = 19
    L_ROW_COUNT = 20
    L_ALLOWANCE = 21         # allowance_rate: yearly amount, or monthly amount x month
    L_MONTHLY = 22
    L_SIZE = 23

    # one adjustment; A_HAS bits say which effects it has
    A_WHEN = 0
    A_HAS = 1
    A_DED = 2
    A_DED_DELTA = 3
    A_RATE = 4
    A_RATE_DELTA = 5
    A_DIVISOR = 6
    A_SIZE = 7
    HAS_DED = 1
    HAS_DED_DELTA = 2
    HAS_RATE = 4
    HAS_RATE_DELTA = 8
    HAS_DIVISOR = 16

    # one group row of a marginal_bands layer
    R_GROUPS = 0             # fact mask of the groups; 0 matches everyone
    R_SHARE = 1              # threshold share bp or NO_VALUE
    R_CAP = 2                # annual cap or NO_VALUE
    R_CAP_SCALED = 3
    R_BAND_START = 4
    R_BAND_COUNT = 5
    R_SIZE = 6

    B_FROM = 0
    B_RATE = 1
    B_SIZE = 2

    S_UPTO = 0               # NO_VALUE on the open last step
    S_SCALE = 1
    S_SIZE = 2

    # one claim row (input)
    C_FACTS = 0              # the facts; REFERRAL and REFERRED_BY_PRIMARY the kernel derives
    C_KIND = 1               # index in model.CLAIM_KINDS
    C_LEVEL = 2              # index in model.LEVELS
    C_MONTH = 3              # calendar month of the service date, 1..12
    C_MONTHS = 4             # continuous months at the service date (二(四)4), >= 1
    C_DAY = 5                # service date as a proleptic ordinal
    C_REFERRED_DAY = 6       # referred_by_primary_on as an ordinal, 0 when absent
    C_TOTAL = 7
    C_FULL_SELFPAY = 8
    C_OVER_LIMIT = 9
    C_PRE_SELFPAY = 10
    C_CHAIN = 11             # deductible already paid along the referral chain
    C_REFERRAL = 12
    C_USE_ACCOUNT = 13
    C_BALANCE = 14           # settle_one only; settle_batch reads the balances array
    C_SIZE = 15

    # one output row: fixed part, then per layer (amount, cap_left or NO_VALUE), then per
    # layer the base added to the layer's cumulative base (marginal_bands layers; 0 otherwise),
    # so that a claim's accumulator deltas are (amount, base added) of its applied layers
    O_STATUS = 0
    O_IN_SCOPE = 1
    O_DEDUCTIBLE = 2
    O_FUND_TOTAL = 3
    O_PATIENT_TOTAL = 4
    O_ACCOUNT_PAID = 5
    O_CASH = 6
    O_BALANCE_AFTER = 7
    O_CHAIN_AFTER = 8
    O_APPLIED = 9            # bit l set: layer l applied (it has a payment, possibly 0)
    O_LAYERS = 10

    # O_STATUS values; on any error the state is left untouched
    ST_OK = 0
    ST_AMOUNT_RANGE = 1      # a bill amount or the chain deductible outside 0..MAX_FEN
    ST_BAD_MONTHS = 2        # continuous months < 1 (service date before continuous_since)
    ST_BAD_CODE = 3          # claim kind, level or month out of range
    ST_NO_ROW = 4            # no group row of a marginal_bands layer matches the member
    ST_BAD_SLOT = 5          # settle_batch: slot or account index out of range
    ST_STATE_RANGE = 6       # an accumulator or the balance outside +-2**62

cdef class CompiledKernel:
    cdef readonly object program      # array('q'): the packed policy, kept alive
    cdef const int64_t* p
    cdef readonly Py_ssize_t n_layers
    cdef readonly Py_ssize_t out_size  # O_LAYERS + 3 * n_layers
    cdef readonly Py_ssize_t state_size  # 2 * n_layers: (paid, base) per layer


cdef int settle_core(const int64_t* p, const int64_t* c, int64_t balance, int64_t* st,
                     int64_t* o) noexcept nogil
