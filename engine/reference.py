"""The reference evaluator: the spec (shared/spec/jiangmen-2018.md) as plain Python.

Readable section by section against the spec; the Cython kernel must agree with it to the fen.
It is pure: a policy snapshot, a member, a claim, the member-year accumulators and the account
balance go in; a ``Settlement`` with the explanation trace comes out. Nothing is mutated.
"""
from __future__ import annotations

from datetime import date, timedelta

from engine.errors import InvalidInput
from engine.model import Accumulators, Claim, LayerPayment, Member, Settlement, Step
from engine.money import BP, apply_rate, round_half_up
from engine.policy import Layer, Policy


# --- §1 who the member is -------------------------------------------------------------------

def continuous_months(member: Member, day: date) -> int:
    """二(四)4: the month ``continuous_since`` falls in counts as month 1."""
    if day < member.continuous_since:
        raise InvalidInput("claim.date", f"service date {day} is before the member's "
                                         f"continuous contribution began ({member.continuous_since})")
    since = member.continuous_since
    return (day.year * 12 + day.month) - (since.year * 12 + since.month) + 1


def cap_scale_bp(policy: Policy, months: int) -> int:
    """二(四)4: inpatient annual caps scale with the continuous months at the service date."""
    for step in policy.continuity_cap_scale.value:
        if step.upto_months is None or months <= step.upto_months:
            return step.scale_bp
    raise AssertionError("the loader guarantees an open last step")


def claim_facts(policy: Policy, member: Member, claim: Claim) -> frozenset[str]:
    """The facts that layer and adjustment conditions are written in (policy.FACTS)."""
    facts = {member.identity, claim.facility_level, *member.groups}
    if member.retired:
        facts.add("RETIRED")
    if member.maternity_eligible:
        facts.add("MATERNITY_ELIGIBLE")
    if claim.home_bed_after_transfer:
        facts.add("HOME_BED_AFTER_TRANSFER")
    if claim.out_of_area_unfiled:
        facts.add("OUT_OF_AREA_UNFILED")
    if claim.childbirth:
        facts.add("CHILDBIRTH")
    if claim.referral:
        facts.add("REFERRAL")
    if member.primary_facility is not None and claim.facility_id == member.primary_facility:
        facts.add("PRIMARY_FACILITY")
    elif member.other_facility is not None and claim.facility_id == member.other_facility:
        facts.add("OTHER_FACILITY")
    referred = claim.referred_by_primary_on
    window = timedelta(days=policy.referral_window_days.value)
    if referred is not None and claim.service_date - window <= referred <= claim.service_date:
        facts.add("REFERRED_BY_PRIMARY")  # 二(四)2(3) 轉診後30日內
    return frozenset(facts)


# --- the evaluator ----------------------------------------------------------------------------

class _Run:
    """The working state of one claim's evaluation, and its trace."""

    def __init__(self, policy: Policy, member: Member, claim: Claim, acc: Accumulators):
        self.policy, self.member, self.claim = policy, member, claim
        self.facts = claim_facts(policy, member, claim)
        self.months = continuous_months(member, claim.service_date)
        self.scale_bp = cap_scale_bp(policy, self.months)
        self.in_scope = claim.bill.in_scope_fen
        self.deductible = 0
        self.paid_on_claim = 0
        self.paid = dict(acc.paid)
        self.base = dict(acc.base)
        self.payments: list[LayerPayment] = []
        self.steps: list[Step] = []

    def step(self, clause: str, what: str, result: int, **inputs: object) -> int:
        self.steps.append(Step(clause, what, inputs, result))
        return result

    def remaining(self) -> int:
        """What the earlier layers left unpaid of the policy-scope amount (never negative)."""
        return max(0, self.in_scope - self.deductible - self.paid_on_claim)

    def applies(self, when: frozenset[str]) -> bool:
        return when <= self.facts

    def cap_left(self, layer: Layer, cap_param, scaled: bool) -> int | None:
        """What an annual cap still allows this year, or None when there is no cap."""
        if cap_param is None:
            return None
        cap = cap_param.value
        if scaled:
            # 二(四)4: exact for every cap and scale in force (whole yuan × 50/70/100 %).
            cap = cap * self.scale_bp // BP
            self.step(self.policy.continuity_cap_scale.ref, f"{layer.id}: cap scaled by "
                      "continuity", cap, cap_fen=cap_param.value, continuous_months=self.months,
                      scale_bp=self.scale_bp)
        return max(0, cap - self.paid.get(layer.id, 0))

    def pay(self, layer: Layer, amount: int, cap_left: int | None) -> None:
        self.paid_on_claim += amount
        self.paid[layer.id] = self.paid.get(layer.id, 0) + amount
        self.payments.append(LayerPayment(layer.id, layer.fund, amount, cap_left))

    def adjusted_rate(self, layer: Layer, rate: int, level_ref: str) -> int:
        for adj in layer.adjustments:
            if not self.applies(adj.when):
                continue
            before = rate
            if adj.rate_bp is not None:
                rate = adj.rate_bp.value
            if adj.rate_delta_bp is not None:
                rate = min(BP, max(0, rate + adj.rate_delta_bp.value))
            if adj.rate_divisor is not None:
                rate //= adj.rate_divisor.value
            if rate != before:
                self.step(adj.ref, f"{layer.id}: rate adjusted", rate, rate_before_bp=before)
        return rate

    # §3.1 -----------------------------------------------------------------------------------
    def deductible_rate(self, layer: Layer) -> None:
        level = self.claim.facility_level
        due = layer.deductible_fen[level].value if layer.deductible_fen else 0
        rate = layer.rate_bp[level].value
        for adj in layer.adjustments:  # applied in the order the policy lists them
            if not self.applies(adj.when):
                continue
            before = (due, rate)
            if adj.deductible_fen is not None:
                due = adj.deductible_fen.value
            if adj.deductible_delta_fen is not None:
                due = max(0, due + adj.deductible_delta_fen.value)
            if adj.rate_bp is not None:
                rate = adj.rate_bp.value
            if adj.rate_delta_bp is not None:
                rate = min(BP, max(0, rate + adj.rate_delta_bp.value))
            if adj.rate_divisor is not None:
                rate //= adj.rate_divisor.value
            if (due, rate) != before:
                self.step(adj.ref, f"{layer.id}: deductible and rate adjusted", due,
                          deductible_before_fen=before[0], rate_before_bp=before[1], rate_bp=rate)
        if layer.referral_chain_ref is not None and self.claim.referral:
            due = self.step(layer.referral_chain_ref, f"{layer.id}: deductible still due on the "
                            "referral chain", max(0, due - self.claim.chain_deductible_fen),
                            deductible_fen=due,
                            chain_paid_fen=self.claim.chain_deductible_fen)
        base = self.remaining()
        deductible = self.step(layer.ref, f"{layer.id}: deductible applied", min(base, due),
                               in_scope_fen=base, deductible_due_fen=due)
        cap_left = self.cap_left(layer, layer.annual_cap_fen, layer.cap_scaled_by_continuity)
        amount = self.step(layer.rate_bp[level].ref, f"{layer.id}: rate × (base − deductible)",
                           apply_rate(base - deductible, rate), base_fen=base - deductible,
                           rate_bp=rate)
        if cap_left is not None and amount > cap_left:
            amount = self.step(layer.annual_cap_fen.ref, f"{layer.id}: cut to the annual cap",
                               cap_left, uncapped_fen=amount)
        floor = layer.childbirth_floor
        if floor is not None and self.applies(floor.when):
            least = min(floor.amount_fen.value, base,
                        cap_left if cap_left is not None else base)
            if amount < least:
                amount = self.step(floor.amount_fen.ref, f"{layer.id}: childbirth floor",
                                   least, floor_fen=floor.amount_fen.value, base_fen=base)
        self.deductible += deductible
        self.pay(layer, amount, cap_left)

    # §3.2, §3.3 -----------------------------------------------------------------------------
    def marginal_bands(self, layer: Layer) -> None:
        groups = self.member.groups
        row = next((r for r in layer.rows if not r.groups or r.groups & groups), None)
        if row is None:  # the loader requires a catch-all last row; hand-built policies may not
            raise ValueError(f"{self.policy.version}: no row of layer {layer.id} matches the "
                             "member's groups")
        base = self.remaining()
        threshold = layer.threshold_fen.value if layer.threshold_fen else 0
        if row.threshold_share_bp is not None:
            # exact: the threshold is whole yuan and the shares whole percent
            threshold = threshold * row.threshold_share_bp.value // BP
        start = self.base.get(layer.id, 0)
        end = start + base
        bands = row.bands.value
        numerator = 0
        for i, band in enumerate(bands):
            lo = max(band.from_fen, threshold, start)
            hi = min(bands[i + 1].from_fen, end) if i + 1 < len(bands) else end
            if hi <= lo:
                continue
            rate = self.adjusted_rate(layer, band.rate_bp, row.bands.ref)
            numerator += (hi - lo) * rate
            self.step(row.bands.ref, f"{layer.id}: band from {band.from_fen}", (hi - lo) * rate,
                      cumulative_from_fen=lo, cumulative_to_fen=hi, rate_bp=rate,
                      threshold_fen=threshold)
        # rounded once per layer, never per band (spec "Units")
        amount = self.step(row.ref, f"{layer.id}: sum over bands, rounded once",
                           round_half_up(numerator, BP), base_fen=base,
                           cumulative_before_fen=start)
        cap_left = self.cap_left(layer, row.annual_cap_fen, row.cap_scaled_by_continuity)
        if cap_left is not None and amount > cap_left:
            amount = self.step(row.annual_cap_fen.ref, f"{layer.id}: cut to the annual cap",
                               cap_left, uncapped_fen=amount)
        self.base[layer.id] = end  # grows by the whole base even when the cap cuts the payment
        self.pay(layer, amount, cap_left)

    # §4 -------------------------------------------------------------------------------------
    def allowance_rate(self, layer: Layer) -> None:
        rate = self.adjusted_rate(layer, layer.rate_bp.value, layer.rate_bp.ref)
        share = self.step(layer.rate_bp.ref, f"{layer.id}: rate × in-scope, less what earlier "
                          "layers paid", max(0, apply_rate(self.in_scope, rate)
                                             - self.paid_on_claim),
                          in_scope_fen=self.in_scope, rate_bp=rate,
                          paid_by_earlier_fen=self.paid_on_claim)
        if layer.yearly_allowance_fen is not None:
            allowance = layer.yearly_allowance_fen
            limit = allowance.value
        else:
            allowance = layer.monthly_allowance_fen
            limit = allowance.value * self.claim.service_date.month  # carried over within the year
        cap_left = max(0, limit - self.paid.get(layer.id, 0))
        amount = min(share, cap_left)
        if amount < share:
            self.step(allowance.ref, f"{layer.id}: cut to the allowance left", amount,
                      allowance_to_date_fen=limit, paid_this_year_fen=self.paid.get(layer.id, 0))
        self.pay(layer, amount, cap_left)


def settle(policy: Policy, member: Member, claim: Claim, acc: Accumulators,
           balance_fen: int = 0) -> Settlement:
    """Settle one claim: breakdown, payment per layer, totals, accumulators after, trace."""
    if acc.year != claim.service_date.year:
        raise ValueError(f"accumulators of {acc.year} given for a claim of "
                         f"{claim.service_date.year}")
    run = _Run(policy, member, claim, acc)
    bill = claim.bill
    run.step("spec §2", "in scope = total − full self-pay − over-limit − pre-self-pay",
             run.in_scope, total_fen=bill.total_fen, full_selfpay_fen=bill.full_selfpay_fen,
             over_limit_fen=bill.over_limit_fen, pre_selfpay_fen=bill.pre_selfpay_fen)
    for layer in policy.layers:
        if layer.claim_kind != claim.kind or not run.applies(layer.when):
            continue
        getattr(run, layer.kind)(layer)

    fund_total = run.paid_on_claim                                     # §5
    patient_total = bill.total_fen - fund_total
    account_paid = min(balance_fen, patient_total) if claim.use_account else 0
    run.step("spec §5", "patient total = total − fund total", patient_total,
             total_fen=bill.total_fen, fund_total_fen=fund_total)
    if claim.use_account:
        run.step("spec §5", "paid from the personal account", account_paid,
                 balance_fen=balance_fen, patient_total_fen=patient_total)
    chain_before = claim.chain_deductible_fen if claim.referral else 0
    return Settlement(
        bill=bill,
        in_scope_fen=run.in_scope,
        deductible_fen=run.deductible,
        payments=tuple(run.payments),
        fund_total_fen=fund_total,
        patient_total_fen=patient_total,
        account_paid_fen=account_paid,
        cash_fen=patient_total - account_paid,
        balance_after_fen=balance_fen - account_paid,
        accumulators_after=Accumulators(acc.year, run.paid, run.base),
        chain_deductible_after_fen=chain_before + run.deductible,
        policy_version=policy.version,
        trace=tuple(run.steps),
    )
