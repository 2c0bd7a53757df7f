"""Shared test settings: hypothesis profiles (ci: the default run; nightly: with -m slow)."""
import os

from hypothesis import HealthCheck, settings

# The scratch PostgreSQL database of the session, for every module (ledger and service tests).
from ledger_fixtures import pg_database  # noqa: E402,F401

settings.register_profile("default", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", deadline=None, max_examples=20_000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
