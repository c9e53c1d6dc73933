"""Grouping in prepare. Counts (per source, reason, split, label, quality rule) go through `group_totals`: each
block is totalled in its own task and the driver adds up the few rows per block as they stream in, with no shuffle.
Groupings that must bring rows together (dedup buckets) go through `grouped`, which first combines
the dataset's blocks (the pack shuffle is a sort with one partition per group instead: `pack.shuffled_rows`).

prepare runs Ray Data's sort shuffle (`prepare_context`), and a sort splits every input block into one piece per
output block, as many outputs as inputs: N blocks in make N² objects, each owned by the driver (small ones held
in its memory). read_parquet splits the few staged files into ~200 blocks, so at 208 MB the shuffles cost ~70 s
each and grew the driver's private memory from 354 to 731 MB (bench prepare-scaling, 1x vs 4x). Combining first
(`repartition(n)`: adjacent blocks concatenated, no shuffle) makes it n² with n sized from the data (dedup
buckets). Counts skip the shuffle altogether: Ray Data's groupby-aggregate over the 231 staged blocks of a 4x
corpus grew the driver's private memory by 150 MB (302 -> 462 MB, bench prepare-scaling, 12-06).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pyarrow as pa
import ray


def grouped(ds: ray.data.Dataset, key: str | list[str], partitions: int):
    """`ds.groupby(key)` over `partitions` combined blocks."""
    return ds.repartition(partitions).groupby(key, num_partitions=partitions)


def _add(a, b):
    return a if b is None else b if a is None else a + b


def _least(a, b):
    return a if b is None else b if a is None else min(a, b)


# a total's pyarrow hash aggregation inside a block, and how two blocks' partial totals combine on the driver
TOTALS: dict[str, tuple[str, Callable[[Any, Any], Any]]] = {"count": ("count_all", _add), "sum": ("sum", _add),
                                                            "min": ("min", _least)}


def _block_totals(block: pa.Table, keys: list[str], totals: dict[str, tuple[str | None, str]]) -> pa.Table:
    specs, names = [], []  # pyarrow's aggregations and the names of their output columns
    for column, how in totals.values():
        function = TOTALS[how][0]
        specs.append(([], function) if column is None else (column, function))
        names.append(function if column is None else f"{column}_{function}")
    out = block.select(list(dict.fromkeys(keys + [c for c, _ in totals.values() if c]))).group_by(keys).aggregate(specs)
    return pa.table([out[k] for k in keys] + [out[n] for n in names], names=keys + list(totals))


def group_totals(ds: ray.data.Dataset, keys: list[str], totals: dict[str, tuple[str | None, str]]) -> list[dict]:
    """One dict per group of `keys` (sorted; a null key is its own group): `totals` maps each output name to
    (column, "count" | "sum" | "min"), "count" counting rows (column None). A sum or min over nulls only is None."""
    combined: dict[tuple, dict] = {}
    partial = ds.map_batches(_block_totals, batch_size=None, batch_format="pyarrow",
                             fn_kwargs={"keys": keys, "totals": totals})
    for block in partial.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in block.to_pylist():
            group = tuple(row[k] for k in keys)
            if group not in combined:
                combined[group] = row
                continue
            into = combined[group]
            for name, (_, how) in totals.items():
                into[name] = TOTALS[how][1](into[name], row[name])
    return [combined[g] for g in sorted(combined, key=lambda g: [(v is not None, v) for v in g])]


def node_cores() -> list[int]:
    """Each alive node's CPUs, the driver's own node counted at most at its core count (this machine's cores before
    Ray starts): raylm's local cluster declares more CPUs than cores so data tasks fit beside training workers
    (runtime.init), and a thread budget must not count those."""
    if not ray.is_initialized():
        return [os.cpu_count() or 1]
    here = ray.get_runtime_context().get_node_id()
    cpus = [(int(n["Resources"].get("CPU", 0)), n["NodeID"] == here) for n in ray.nodes() if n.get("Alive")]
    cores = [min(c, os.cpu_count() or 1) if local else c for c, local in cpus]
    return [c for c in cores if c > 0] or [1]
