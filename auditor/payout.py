"""Payout arithmetic: dividing a pool of money by credit, exactly.

Money is counted in integer minor units (cents; yen) and divided with fractions,
never floats, in three steps:

1. quota = pool × credit / Σ credit, for every contributor;
2. a contributor whose quota is below the minimum payout gets nothing, and the pool
   is divided again among the others, pro rata to their credit (this only raises
   the others' quotas, so nobody else falls below the minimum: one pass suffices);
3. every quota is rounded down to a whole minor unit, and the units still missing
   go one each to the largest remainders (ties: key order), so the amounts add up
   exactly to the pool (the largest-remainder method).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from .errors import AuditError

# ISO 4217 minor-unit digits of the currencies a pool can be paid in.
MINOR_UNITS = {
    "AUD": 2,
    "BRL": 2,
    "CAD": 2,
    "CHF": 2,
    "CNY": 2,
    "CZK": 2,
    "DKK": 2,
    "EUR": 2,
    "GBP": 2,
    "HKD": 2,
    "HUF": 2,
    "INR": 2,
    "MXN": 2,
    "NOK": 2,
    "NZD": 2,
    "PLN": 2,
    "SEK": 2,
    "SGD": 2,
    "USD": 2,
    "ZAR": 2,
    "CLP": 0,
    "ISK": 0,
    "JPY": 0,
    "KRW": 0,
    "VND": 0,
    "BHD": 3,
    "JOD": 3,
    "KWD": 3,
    "OMR": 3,
    "TND": 3,
}


def minor_digits(currency: str) -> int:
    try:
        return MINOR_UNITS[currency]
    except KeyError:
        raise AuditError(f"unknown currency {currency!r}; use one of {', '.join(sorted(MINOR_UNITS))}") from None


def to_minor(amount: Decimal, currency: str, what: str = "amount") -> int:
    """A non-negative amount as a whole number of the currency's minor units; finer amounts are refused, not rounded."""
    units = Decimal(amount).scaleb(minor_digits(currency))
    if not units.is_finite() or units < 0 or units != units.to_integral_value():
        raise AuditError(
            f"{what} {amount} is not a non-negative {currency} amount with at most {minor_digits(currency)} decimal places"
        )
    return int(units)


def from_minor(units: int, currency: str) -> Decimal:
    return Decimal(units).scaleb(-minor_digits(currency))


def fraction_to_decimal(value: Fraction, currency: str, extra_digits: int = 2) -> Decimal:
    """An unrounded quota in minor units, shown in the currency with `extra_digits` beyond its minor unit."""
    digits = minor_digits(currency) + extra_digits
    return Decimal(round(value * 10**extra_digits)).scaleb(-digits)


def largest_remainder(quotas: Mapping[str, Fraction]) -> dict[str, int]:
    """Round quotas (in minor units, adding up to a whole number) to integers with the same sum."""
    total = sum(quotas.values(), Fraction(0))
    if total.denominator != 1:
        raise ValueError(f"quotas add up to {total}, not a whole number of minor units")
    amounts = {key: q.numerator // q.denominator for key, q in quotas.items()}
    missing = int(total) - sum(amounts.values())
    by_remainder = sorted(quotas, key=lambda key: (-(quotas[key] - amounts[key]), key))
    for key in by_remainder[:missing]:
        amounts[key] += 1
    return amounts


@dataclass(frozen=True)
class Split:
    """A pool divided by credit; every amount is in minor units."""

    pool: int
    min_payout: int
    credit: dict[str, Fraction]
    credit_total: Fraction  # Σ credit over everyone
    paid: frozenset[str]  # those with credit whose quota reaches the minimum payout
    paid_credit_total: Fraction  # Σ credit over `paid`
    quota: dict[str, Fraction]  # pool × credit / credit_total
    adjusted: dict[str, Fraction]  # pool × credit / paid_credit_total for `paid`, else 0
    amount: dict[str, int]  # adjusted, rounded by largest remainder: Σ amount == pool


def split(pool: int, credits: Mapping[str, float | int | Fraction], min_payout: int = 0) -> Split:
    """Divide `pool` minor units pro rata to `credits` (non-negative), with a minimum payout (see the module doc)."""
    credit = {key: Fraction(value) for key, value in credits.items()}
    if any(value < 0 for value in credit.values()):
        raise ValueError("credits must be non-negative")
    total = sum(credit.values(), Fraction(0))
    if total == 0:
        raise AuditError("nothing to divide: no contributor has any credit in this period")
    quota = {key: pool * value / total for key, value in credit.items()}
    paid = frozenset(key for key, value in credit.items() if value > 0 and quota[key] >= min_payout)
    if not paid:
        raise AuditError(
            f"no contributor reaches the minimum payout ({min_payout} minor units); lower it or raise the pool"
        )
    paid_total = sum((credit[key] for key in paid), Fraction(0))
    adjusted = {key: pool * credit[key] / paid_total if key in paid else Fraction(0) for key in credit}
    return Split(pool, min_payout, credit, total, paid, paid_total, quota, adjusted, largest_remainder(adjusted))
