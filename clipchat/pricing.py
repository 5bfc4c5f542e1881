"""Money: the unit every cost is recorded in, and the prices computed from settings.

Costs are ``Decimal`` to 0.0001 (the ``DECIMAL(10,4)`` columns), rounded half up, everywhere: the
providers' bills, the estimates shown before a change, the composition's price and the totals.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

MONEY_FRACTION = Decimal("0.0001")


def round_money(amount: Decimal) -> Decimal:
    """``amount`` to 0.0001, half up: the unit every cost is recorded in."""
    return amount.quantize(MONEY_FRACTION, rounding=ROUND_HALF_UP)


def composition_cost(price_per_second: Decimal, video_seconds: float) -> Decimal:
    """What composing a video of ``video_seconds`` costs (its length to the millisecond)."""
    return round_money(price_per_second * Decimal(str(round(video_seconds, 3))))
