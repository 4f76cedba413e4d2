"""Prices for a small shop (the module that `ohd demo` writes tests for)."""


def total(prices: list[float], discount: float = 0.0) -> float:
    """Sum the prices and apply a fractional discount.

    >>> total([10.0, 5.5])
    15.5
    >>> total([100.0], discount=0.25)
    75.0
    """
    if not 0.0 <= discount < 1.0:
        raise ValueError("discount must be in [0, 1)")
    return round(sum(prices) * (1.0 - discount), 2)


def is_free(price: float) -> bool:
    """True when the price is zero.

    >>> is_free(0)
    True
    """
    return price == 0


class Cart:
    """A list of prices with a running total."""

    def __init__(self) -> None:
        self.items: list[float] = []

    def add(self, price: float) -> None:
        if price < 0:
            raise ValueError("negative price")
        self.items.append(price)

    def total(self) -> float:
        return total(self.items)
