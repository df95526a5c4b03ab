"""The order a job runs its cells' repeats in: cycles over the cells, each shuffled by the seed."""

from __future__ import annotations

import dataclasses
import random

from w2w.cell import Cell


def run_order(cells: list[Cell]) -> list[Cell]:
    """Each cell once per repeat, as cells whose `repeat` says which run they are.

    repeats=1 everywhere: the planned order, unchanged. Otherwise cycle k runs repeat k of every cell
    that has one, in an order drawn from the seed, so drift and heat spread over all the cells instead
    of landing on one cell's runs. The order depends only on the set of cells and their seed (where a
    job's cells differ in seed: the first by id): the same command gives the same order, in a requeued
    job too, and another seed another order.
    """
    if all(c.repeats == 1 for c in cells):
        return list(cells)
    ordered = sorted(cells, key=lambda c: c.id)  # independent of how the planner listed them
    rng = random.Random(f"w2w-repeats:{ordered[0].seed}")
    runs = []
    for repeat in range(max(c.repeats for c in cells)):
        cycle = [c for c in ordered if repeat < c.repeats]
        rng.shuffle(cycle)
        runs += [dataclasses.replace(c, repeat=repeat) for c in cycle]
    return runs
