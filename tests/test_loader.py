"""The strict policy loader (issue 2 item 2): one malformed fixture per error kind, each with
the words its message must contain; the bundled policy; choosing the policy and the dated
values in force by region and day.

Every fixture in tests/fixtures/policies/malformed is the valid template
tests/fixtures/policies/minimal/jiangmen/2018-01-01.yaml broken in exactly one place (its first
line says where).
"""
from __future__ import annotations

import dataclasses
from datetime import date
from pathlib import Path

import pytest

from engine.errors import NoPolicyInForce, PolicyFileError
from engine.loader import BUNDLED, PolicyStore, load_policy_file
from engine.policy import Dated, Param
from engine_helpers import (  # noqa: F401  (impl is a fixture)
    FIXTURES, funds, impl, inpatient, one, policy_copy, resident,
)

MALFORMED = FIXTURES / "malformed"

# file → the words its message must contain besides the file name: the parameter path, then
# the problem.
MUST_SAY = {
    "unknown_key.yaml": ["layers[0]", "unknown key", "annual_cap"],
    "missing_key.yaml": ["(top level)", "missing key", "referral_window_days"],
    "missing_ref.yaml": ["layers[0].rate_bp.2018-01-01", "missing clause reference", "ref"],
    "empty_ref.yaml": ["layers[0].ref", "non-empty"],
    "bad_date_key.yaml": ["layers[0].annual_cap_fen", "2018-02-30", "not a date"],
    "bad_effective_date.yaml": ["effective", "2018-13-01", "not a date"],
    "last_row_not_catch_all.yaml": ["layers[1].rows[0].groups", "catch everyone"],
    "date_key_not_a_date.yaml": ["layers[0].annual_cap_fen", "2018-1-1", "not a date"],
    "unsorted_dates.yaml": ["layers[0].annual_cap_fen", "not in increasing order"],
    "negative_amount.yaml": ["layers[0].annual_cap_fen.2018-01-01.value", "negative", "-1"],
    "amount_not_integer.yaml": ["layers[0].annual_cap_fen.2018-01-01.value", "integer",
                                "200000.5"],
    "rate_above_100_percent.yaml": ["layers[0].rate_bp.2018-01-01.value", "0–10000", "10001"],
    "rate_below_0.yaml": ["layers[1].rows[0].bands.2018-01-01.value[0].rate_bp", "0–10000",
                          "-100"],
    "rate_delta_out_of_range.yaml": ["layers[0].adjustments[0].rate_delta_bp", "±10000",
                                     "10500"],
    "band_edges_not_increasing.yaml": ["layers[1].rows[0].bands.2018-01-01.value[2]",
                                       "band edges must increase"],
    "first_band_not_at_0.yaml": ["layers[1].rows[0].bands.2018-01-01.value[0].from_fen",
                                 "first band must start at 0"],
    "scale_last_step_not_open.yaml": ["continuity_cap_scale", "upto_months", "last step"],
    "unknown_fact.yaml": ["layers[0].adjustments[0].when", "unknown name", "RETIERD"],
    "unknown_group.yaml": ["layers[1].rows[0].groups", "unknown name", "POOR"],
    "unknown_layer_kind.yaml": ["layers[1].kind", "unknown layer kind", "copayment"],
    "unknown_claim_kind.yaml": ["layers[0].claim_kind", "unknown claim kind", "DENTAL"],
    "adjustment_without_effect.yaml": ["layers[0].adjustments[0]", "no effect"],
    "divisor_zero.yaml": ["layers[0].adjustments[0].rate_divisor", "at least 1"],
    "duplicate_key.yaml": ["duplicate key", "threshold_fen", "line 33"],
    "duplicate_layer_id.yaml": ["layers", "duplicate layer id", "tier1"],
    "missing_value_on_effective_date.yaml": ["layers[1].threshold_fen", "no value in force",
                                             "2018-01-01"],
    "bad_yaml.yaml": ["not valid YAML", "line"],
}

def test_every_malformed_fixture_has_a_row_in_the_table():
    assert sorted(p.name for p in MALFORMED.glob("*.yaml")) == sorted(MUST_SAY)


def test_the_template_of_the_malformed_fixtures_is_valid():
    store = PolicyStore(FIXTURES / "minimal")
    assert [layer.id for layer in store.policy_for("jiangmen", date(2018, 1, 1)).layers] == [
        "tier1", "critical"]


@pytest.mark.parametrize("name", sorted(MUST_SAY))
def test_a_malformed_policy_file_is_refused_naming_file_path_and_problem(name):
    with pytest.raises(PolicyFileError) as e:
        load_policy_file(MALFORMED / name)
    message = str(e.value)
    for word in [name, *MUST_SAY[name]]:
        assert word in message, f"{word!r} not in {message!r}"
    assert e.value.file.endswith(name)


def test_a_file_in_the_wrong_region_folder_is_refused():
    with pytest.raises(PolicyFileError) as e:
        PolicyStore(FIXTURES / "region_mismatch")
    message = str(e.value)
    for word in ["2018-01-01.yaml", "region", "'jiangmen'", "'foshan'"]:
        assert word in message, f"{word!r} not in {message!r}"


def test_a_folder_holding_a_malformed_file_does_not_load(tmp_path):
    folder = tmp_path / "jiangmen"
    folder.mkdir()
    (folder / "2018-01-01.yaml").write_bytes((MALFORMED / "negative_amount.yaml").read_bytes())
    with pytest.raises(PolicyFileError, match="must not be negative"):
        PolicyStore(tmp_path)


# --- the bundled policy ------------------------------------------------------------------------

def test_the_bundled_jiangmen_policy_loads_with_its_layers_in_order():
    store = PolicyStore(BUNDLED)
    assert store.regions() == ["jiangmen"]
    policy = store.policy_for("jiangmen", date(2018, 1, 1))
    assert policy.version.startswith("jiangmen/2018-01-01#")
    assert [layer.id for layer in policy.layers] == [
        "inpatient_tier1", "inpatient_tier2", "critical_illness", "outpatient_tier1_primary",
        "outpatient_tier2_primary", "outpatient_tier2_other"]


def _params(obj, path=""):
    """Every Param of a policy snapshot, with its path."""
    if isinstance(obj, Param):
        yield path, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _params(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, (tuple, list)):
        for i, x in enumerate(obj):
            yield from _params(x, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _params(v, f"{path}.{k}")


def test_every_bundled_parameter_in_force_cites_a_clause():
    policy = PolicyStore(BUNDLED).policy_for("jiangmen", date(2018, 6, 1))
    params = list(_params(policy))
    assert len(params) > 30
    for path, p in params:
        assert isinstance(p.ref, str) and p.ref.strip(), path
        assert not isinstance(p.value, Dated), path


def test_the_spec_numbers_are_in_the_bundled_policy():
    # A few values straight from the spec, read through the loaded snapshot.
    policy = PolicyStore(BUNDLED).policy_for("jiangmen", date(2018, 6, 1))
    tier1 = policy.layer("inpatient_tier1")
    assert {lvl: p.value for lvl, p in tier1.deductible_fen.items()} == {
        "LEVEL_1": 50000, "LEVEL_2": 60000, "LEVEL_3": 90000, "NON_DESIGNATED": 150000}
    assert {lvl: p.value for lvl, p in tier1.rate_bp.items()} == {
        "LEVEL_1": 8500, "LEVEL_2": 8000, "LEVEL_3": 5500, "NON_DESIGNATED": 4000}
    ci = policy.layer("critical_illness")
    assert ci.threshold_fen.value == 1_000_000
    assert ci.threshold_fen.since == date(2017, 1, 1)


# --- choosing the policy and the values in force ---------------------------------------------

def test_no_policy_is_in_force_before_2018_01_01():
    with pytest.raises(NoPolicyInForce) as e:
        PolicyStore(BUNDLED).policy_for("jiangmen", date(2017, 12, 31))
    assert e.value.field == "date"
    assert "2017-12-31" in str(e.value) and "2018-01-01" in str(e.value)


def test_an_unknown_region_is_refused_naming_it():
    with pytest.raises(NoPolicyInForce) as e:
        PolicyStore(BUNDLED).policy_for("foshan", date(2018, 6, 1))
    assert "foshan" in str(e.value) and "jiangmen" in str(e.value)


THRESHOLD_2017 = ("      2017-01-01: {value: 1000000, ref: \"二(四)1(4) 起賠標準…2017年維持1萬元不變 "
                  "(in force until the bureau's published value is added)\"}")
THRESHOLD_2019 = "\n      2019-01-01: {value: 1200000, ref: \"test: the bureau publishes 12,000 yuan\"}"


def test_a_dated_parameter_change_is_picked_by_the_service_date(tmp_path):
    # A later dated value is a data edit: the 2019 threshold applies from 2019-01-01 only.
    store = policy_copy(tmp_path, {THRESHOLD_2017: THRESHOLD_2017 + THRESHOLD_2019})
    before = store.policy_for("jiangmen", date(2018, 12, 31)).layer("critical_illness")
    after = store.policy_for("jiangmen", date(2019, 1, 1)).layer("critical_illness")
    assert (before.threshold_fen.value, before.threshold_fen.since) == (1_000_000,
                                                                        date(2017, 1, 1))
    assert (after.threshold_fen.value, after.threshold_fen.since) == (1_200_000, date(2019, 1, 1))
    assert after.threshold_fen.ref.startswith("test:")


def test_a_settlement_uses_the_threshold_in_force_on_its_date(impl, tmp_path):
    # §3.3 with T dated: resident L3 40,900, base 18,000 (tier 1 = 55% × 40,000 = 22,000).
    # 2018-12-31: 60% × (18,000 − 10,000) = 4,800.  2019-01-02: 60% × (18,000 − 12,000) = 3,600.
    store = policy_copy(tmp_path, {THRESHOLD_2017: THRESHOLD_2017 + THRESHOLD_2019})
    s2018 = one(impl, resident(), inpatient("40900.00", day=date(2018, 12, 31)),
                policy_store=store)
    s2019 = one(impl, resident(), inpatient("40900.00", day=date(2019, 1, 2)), policy_store=store)
    assert funds(s2018)["CRITICAL_ILLNESS"] == "4800.00"
    assert funds(s2019)["CRITICAL_ILLNESS"] == "3600.00"


def test_a_later_policy_file_takes_over_from_its_effective_date(tmp_path):
    # Two files in one region folder: the newest effective on or before the day is chosen.
    store = policy_copy(tmp_path)
    later = (tmp_path / "jiangmen" / "2018-01-01.yaml").read_text(encoding="utf-8").replace(
        "effective: 2018-01-01", "effective: 2020-01-01", 1)
    (tmp_path / "jiangmen" / "2020-01-01.yaml").write_text(later, encoding="utf-8")
    store = PolicyStore(tmp_path)
    assert store.policy_for("jiangmen", date(2019, 12, 31)).version.startswith(
        "jiangmen/2018-01-01#")
    assert store.policy_for("jiangmen", date(2020, 1, 1)).version.startswith(
        "jiangmen/2020-01-01#")


def test_loading_is_read_only(tmp_path):
    # Loading never rewrites a policy file (the version hash is of the bytes as given).
    store = policy_copy(tmp_path)
    path = Path(tmp_path / "jiangmen" / "2018-01-01.yaml")
    text = path.read_bytes()
    PolicyStore(tmp_path).policy_for("jiangmen", date(2018, 6, 1))
    assert path.read_bytes() == text
    assert store.policy_for("jiangmen", date(2018, 6, 1)).version == PolicyStore(
        BUNDLED).policy_for("jiangmen", date(2018, 6, 1)).version
