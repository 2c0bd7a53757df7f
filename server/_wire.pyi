"""Type stubs of the batch RPCs' C codec (server/_wire.pyx)."""
from array import array
from typing import Final

INT_COLUMNS: tuple[str, ...]
MEMO_MAX: int
E_OK: Final[int]
E_MEMBER_INDEX: Final[int]
E_FACILITY_INDEX: Final[int]
E_KIND: Final[int]
E_DATE: Final[int]
E_TOTAL: Final[int]
E_FULL_SELFPAY: Final[int]
E_OVER_LIMIT: Final[int]
E_PRE_SELFPAY: Final[int]
E_IN_SCOPE: Final[int]
E_FLAGS: Final[int]
E_INPATIENT_FLAG: Final[int]
E_REFERRED_INPATIENT: Final[int]
E_REFERRED_DATE: Final[int]
E_MEMBER_UNKNOWN: Final[int]
E_FACILITY_UNKNOWN: Final[int]
E_BEFORE_BENEFIT: Final[int]
E_AFTER_BENEFIT: Final[int]
E_BEFORE_CONTINUOUS: Final[int]
E_NO_POLICY: Final[int]
E_REFUSED: Final[int]
E_KERNEL: Final[int]

class WireError(ValueError): ...

def decode_batch(data: bytes) -> tuple[bool, list[str], list[str], list[str], list[array]]: ...
def date_ordinal(yyyymmdd: int) -> int: ...
def member_table(members: list, fidx: dict[str, int], regions: dict[str, int],
                 identity_bits: dict[str, int], group_bits: dict[str, int], retired_bit: int,
                 maternity_bit: int, ok: array, mask: array, since: array, since_ym: array,
                 bstart: array, bend: array, primary: array, other: array, region: array,
                 balance: array, memo: dict) -> None: ...
def first_bad_id(ids: list[str], max_len: int) -> int: ...
def build_rows(n: int, cols: list[array], chain: array, referral: array, m_ok: array,
               m_mask: array, m_since: array, m_bstart: array, m_bend: array,
               m_primary: array, m_other: array, m_region: array, f_ok: array,
               f_level: array, level_bits: array, flag_bits: array, r_start: array,
               r_count: array, b_from: array, b_policy: array, codes: array, rows: array,
               policy: array, year: array) -> int: ...
def set_months(n: int, member: array, m_since_ym: array, codes: array, rows: array,
               service_date: array) -> int: ...
def assign_slots(n: int, member: array, year: array, codes: array, min_year: int,
                 n_years: int, slots: array, used: array) -> int: ...
def gather_results(n: int, out: array, osz: int, codes: array, policy: array,
                   pol_nlayers: array, pol_offset: array, base_code: int
                   ) -> tuple[list[array], array, array, array, array]: ...
def packed(field: int, values: array) -> bytes: ...
def strings(field: int, values: list[str]) -> bytes: ...
def length_delimited(field: int, data: bytes) -> bytes: ...
def validate_claims(n: int, cols: list[array], referral: array, nm: int, nf: int,
                    codes: array) -> int: ...
def request_digests(n: int, cols: list[array], member_ids: list[str],
                    facility_ids: list[str], request_ids: list[str],
                    codes: array) -> list[str | None]: ...
def stored_settlements(n: int, cols: list[array], out: array, osz: int, codes: array,
                       policy: array, select: array, plans: list, request_ids: list[str],
                       member_ids: list[str], facility_ids: list[str], m_identity: array,
                       outcome: type) -> list: ...
def nonzero(a: array) -> list[int]: ...
def year_range(year: array, codes: array) -> tuple[int, int] | None: ...
