"""The source file of `llamad bench --speculation`'s edit workload (about 1,500 tokens for
Gemma 3's tokenizer): a model returns it with one change. Plain data; never imported by
the server."""

SOURCE = '''"""Inventory service: stock levels, reservations and reorder planning."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import logging
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger("inventory")

REORDER_MARGIN = 0.15
DEFAULT_LEAD_DAYS = 7


@dataclasses.dataclass
class Item:
    sku: str
    name: str
    on_hand: int
    reserved: int = 0
    lead_days: int = DEFAULT_LEAD_DAYS
    daily_demand: float = 0.0

    @property
    def available(self) -> int:
        return max(0, self.on_hand - self.reserved)

    def reorder_point(self) -> int:
        """Stock that covers the lead time, plus a safety margin."""
        need = self.daily_demand * self.lead_days
        return int(need * (1 + REORDER_MARGIN) + 0.5)


@dataclasses.dataclass
class Reservation:
    order_id: str
    sku: str
    quantity: int
    created: dt.datetime


class OutOfStock(Exception):
    def __init__(self, sku: str, wanted: int, available: int):
        super().__init__(f"{sku}: wanted {wanted}, only {available} available")
        self.sku = sku
        self.wanted = wanted
        self.available = available


def load_items(path: Path) -> dict[str, Item]:
    """Reads the stock file: one item per row (sku, name, on_hand, lead_days)."""
    items: dict[str, Item] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            sku = row["sku"].strip()
            if not sku:
                continue
            items[sku] = Item(
                sku=sku,
                name=row.get("name", "").strip(),
                on_hand=int(row.get("on_hand") or 0),
                lead_days=int(row.get("lead_days") or DEFAULT_LEAD_DAYS),
            )
    log.info("loaded %d items from %s", len(items), path)
    return items


def save_items(items: dict[str, Item], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "name", "on_hand", "lead_days"])
        for item in sorted(items.values(), key=lambda i: i.sku):
            writer.writerow([item.sku, item.name, item.on_hand, item.lead_days])


class Inventory:
    def __init__(self, items: dict[str, Item]):
        self.items = items
        self.reservations: dict[str, list[Reservation]] = defaultdict(list)

    def get(self, sku: str) -> Item:
        try:
            return self.items[sku]
        except KeyError:
            raise KeyError(f"unknown sku {sku!r}") from None

    def reserve(self, order_id: str, sku: str, quantity: int) -> Reservation:
        item = self.get(sku)
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        if item.available < quantity:
            raise OutOfStock(sku, quantity, item.available)
        item.reserved += quantity
        reservation = Reservation(order_id, sku, quantity, dt.datetime.now(dt.timezone.utc))
        self.reservations[order_id].append(reservation)
        return reservation

    def release(self, order_id: str) -> int:
        """Gives back every reservation of an order; the number of units released."""
        released = 0
        for reservation in self.reservations.pop(order_id, []):
            item = self.get(reservation.sku)
            item.reserved -= reservation.quantity
            released += reservation.quantity
        return released

    def ship(self, order_id: str) -> list[tuple[str, int]]:
        shipped = []
        for reservation in self.reservations.pop(order_id, []):
            item = self.get(reservation.sku)
            item.reserved -= reservation.quantity
            item.on_hand -= reservation.quantity
            shipped.append((reservation.sku, reservation.quantity))
        log.info("order %s shipped: %s", order_id, shipped)
        return shipped

    def receive(self, sku: str, quantity: int) -> None:
        item = self.get(sku)
        item.on_hand += quantity

    def record_demand(self, history: Iterable[tuple[str, int]], days: int) -> None:
        """Sets each item's daily demand from (sku, units sold) over `days` days."""
        totals: dict[str, int] = defaultdict(int)
        for sku, units in history:
            totals[sku] += units
        for sku, item in self.items.items():
            item.daily_demand = totals.get(sku, 0) / max(days, 1)

    def below_reorder_point(self) -> Iterator[Item]:
        for item in self.items.values():
            if item.available <= item.reorder_point():
                yield item

    def reorder_plan(self) -> list[tuple[str, int]]:
        """What to order now: enough to reach twice the reorder point."""
        plan = []
        for item in self.below_reorder_point():
            target = 2 * item.reorder_point()
            quantity = max(0, target - item.available)
            if quantity:
                plan.append((item.sku, quantity))
        return sorted(plan)


def summary(inventory: Inventory) -> str:
    lines = [f"{'sku':<10} {'name':<24} {'on hand':>8} {'reserved':>8}"]
    for item in sorted(inventory.items.values(), key=lambda i: i.sku):
        lines.append(f"{item.sku:<10} {item.name:<24} {item.on_hand:>8} {item.reserved:>8}")
    return "\\n".join(lines)


def main(path: str) -> None:
    inventory = Inventory(load_items(Path(path)))
    for sku, quantity in inventory.reorder_plan():
        print(f"reorder {sku}: {quantity}")
    print(summary(inventory))


if __name__ == "__main__":
    import sys

    main(sys.argv[1])
'''

# The one change asked for, as a raw prompt (no chat template: the same text reaches llamad
# and llama-server, and the demo model is a base model): the file, then its edited copy begun.
PROMPT = (
    "Below is a Python file, then the same file with the constant REORDER_MARGIN renamed to "
    "SAFETY_MARGIN. Nothing else changes.\n\n### inventory.py (before)\n```python\n"
    + SOURCE
    + "```\n\n### inventory.py (after)\n```python\n"
)
