"""Type stubs of the single-claim calls' C codec (server/_single.pyx)."""
from array import array
from datetime import date
from typing import Final

F_USE_ACCOUNT: Final[int]
F_HOME_BED: Final[int]
F_OUT_OF_AREA: Final[int]
F_CHILDBIRTH: Final[int]

# (request_id, member_id, facility_id, kind, service_date, total_fen, full_selfpay_fen,
#  over_limit_fen, pre_selfpay_fen, flags)
Parsed = tuple[str, str, str, int, date, int, int, int, int, int]

def parse_settle(data: bytes) -> Parsed | None: ...
def request_digest(req: Parsed) -> str: ...

class WirePlan:
    def __init__(self, kernel: object, layer_ids: list[str], layer_heads: list[bytes],
                 fund_heads: list[bytes], code_index: list[int], version: str) -> None: ...

class WireView:
    def __init__(self, entries: list[tuple]) -> None: ...

def settle(plan: WirePlan, view: WireView, req: Parsed, facts: int, level: int, months: int,
           scale: int, state: array, balance: int, identity: int,
           pre: bool) -> bytes | tuple[bytes, dict[str, tuple[int, int]], int, int, int] | None: ...

class ClaimContext:
    member: object
    facility: object
    accumulators: object
    region: str
    balance_fen: int
    mask: int
    facts: int
    level: int
    identity: int
    since_month: int
    year: int
    def __init__(self, member: object, facility: object, accumulators: object,
                 balance_fen: int, mask: int, facts: int, level: int, identity: int) -> None: ...
    def settle(self, plan: object, req: Parsed,
               pre: bool) -> bytes | tuple[bytes, dict[str, tuple[int, int]], int, int, int] | None: ...
