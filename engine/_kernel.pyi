"""Type stubs of the settlement kernel (engine/_kernel.pyx); layouts in _kernel.pxd."""
from array import array
from typing import Final, Sequence

# packed-program, claim-row and output-row layout; status codes (see _kernel.pxd)
LAYOUT_VERSION: Final[int]
MAX_LAYERS: Final[int]
NO_VALUE: Final[int]
H_VERSION: Final[int]
H_SIZE: Final[int]
H_NLAYERS: Final[int]
H_LAYERS: Final[int]
H_ADJ: Final[int]
H_NADJ: Final[int]
H_ROWS: Final[int]
H_NROWS: Final[int]
H_BANDS: Final[int]
H_NBANDS: Final[int]
H_SCALE: Final[int]
H_NSCALE: Final[int]
H_WINDOW: Final[int]
H_BIT_REFERRED: Final[int]
H_BIT_REFERRAL: Final[int]
H_HEADER_SIZE: Final[int]
K_DEDUCTIBLE_RATE: Final[int]
K_MARGINAL_BANDS: Final[int]
K_ALLOWANCE_RATE: Final[int]
L_KIND: Final[int]
L_CLAIM_KIND: Final[int]
L_WHEN: Final[int]
L_ADJ_START: Final[int]
L_ADJ_COUNT: Final[int]
L_DED: Final[int]
L_RATE: Final[int]
L_CAP: Final[int]
L_CAP_SCALED: Final[int]
L_CHAIN: Final[int]
L_FLOOR_WHEN: Final[int]
L_FLOOR: Final[int]
L_THRESHOLD: Final[int]
L_ROW_START: Final[int]
L_ROW_COUNT: Final[int]
L_ALLOWANCE: Final[int]
L_MONTHLY: Final[int]
L_SIZE: Final[int]
A_WHEN: Final[int]
A_HAS: Final[int]
A_DED: Final[int]
A_DED_DELTA: Final[int]
A_RATE: Final[int]
A_RATE_DELTA: Final[int]
A_DIVISOR: Final[int]
A_SIZE: Final[int]
HAS_DED: Final[int]
HAS_DED_DELTA: Final[int]
HAS_RATE: Final[int]
HAS_RATE_DELTA: Final[int]
HAS_DIVISOR: Final[int]
R_GROUPS: Final[int]
R_SHARE: Final[int]
R_CAP: Final[int]
R_CAP_SCALED: Final[int]
R_BAND_START: Final[int]
R_BAND_COUNT: Final[int]
R_SIZE: Final[int]
B_FROM: Final[int]
B_RATE: Final[int]
B_SIZE: Final[int]
S_UPTO: Final[int]
S_SCALE: Final[int]
S_SIZE: Final[int]
C_FACTS: Final[int]
C_KIND: Final[int]
C_LEVEL: Final[int]
C_MONTH: Final[int]
C_MONTHS: Final[int]
C_DAY: Final[int]
C_REFERRED_DAY: Final[int]
C_TOTAL: Final[int]
C_FULL_SELFPAY: Final[int]
C_OVER_LIMIT: Final[int]
C_PRE_SELFPAY: Final[int]
C_CHAIN: Final[int]
C_REFERRAL: Final[int]
C_USE_ACCOUNT: Final[int]
C_BALANCE: Final[int]
C_SIZE: Final[int]
O_STATUS: Final[int]
O_IN_SCOPE: Final[int]
O_DEDUCTIBLE: Final[int]
O_FUND_TOTAL: Final[int]
O_PATIENT_TOTAL: Final[int]
O_ACCOUNT_PAID: Final[int]
O_CASH: Final[int]
O_BALANCE_AFTER: Final[int]
O_CHAIN_AFTER: Final[int]
O_APPLIED: Final[int]
O_LAYERS: Final[int]
ST_OK: Final[int]
ST_AMOUNT_RANGE: Final[int]
ST_BAD_MONTHS: Final[int]
ST_BAD_CODE: Final[int]
ST_NO_ROW: Final[int]
ST_BAD_SLOT: Final[int]
ST_STATE_RANGE: Final[int]

POLICY_MAX_FEN: Final[int]
STATE_LIMIT: Final[int]

class CompiledKernel:
    """A checked, packed policy program (engine.kernel.pack_policy)."""

    program: array
    n_layers: int
    out_size: int
    state_size: int
    def __init__(self, program: Sequence[int] | array) -> None: ...

def settle_one(kernel: CompiledKernel, claim: array, state: array, out: array) -> int:
    """One claim row (array('q'), C_SIZE) into out; adds it to state. Returns the status."""

def settle_row(kernel: CompiledKernel, claim: tuple[int, ...], state: array, out: array) -> int:
    """settle_one with the claim row as a tuple."""

def settle_batch(kernel: CompiledKernel, claims: array | memoryview, slots: array | memoryview,
                 state: array | memoryview, balances: array | memoryview,
                 out: array | memoryview, accounts: array | memoryview | None = None) -> int:
    """Many claims in order over member-year state slots; returns how many were refused."""
