"""The durable ledger (see ``base`` for the contract)."""
from server.ledger.base import (  # noqa: F401
    Conflict, FacilityRecord, Forbidden, Ledger, LedgerError, MemberRecord, MemberState,
    NotFound, Outcome, SettleResult, SettlementRecord, open_ledger,
)
