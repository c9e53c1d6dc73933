"""Grouping in prepare: every groupby goes through `grouped`, which first combines the dataset's blocks (the pack
shuffle is a sort with one partition per group instead: `pack.shuffled_rows`).

prepare runs Ray Data's sort shuffle (`prepare_context`), and a sort splits every input block into one piece per
output block, as many outputs as inputs: N blocks in make N² objects, each owned by the driver (small ones held
in its memory). read_parquet splits the few staged files into ~200 blocks, so at 208 MB the shuffles cost ~70 s
each and grew the driver's private memory from 354 to 731 MB (bench prepare-scaling, 1x vs 4x). Combining first
(`repartition(n)`: adjacent blocks concatenated, no shuffle) makes it n² with n sized from the data (dedup
buckets, drop buckets) or, for counts, from the cluster's CPUs.
"""

from __future__ import annotations

import os

import ray


def cluster_cpus() -> int:
    """CPUs of the cluster (of this machine before Ray starts)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1)


def cluster_partitions() -> int:
    """Partitions for a count aggregation: one per CPU of the cluster (its rows are a few bytes per document)."""
    return cluster_cpus()


def grouped(ds: ray.data.Dataset, key: str | list[str], partitions: int | None = None):
    """`ds.groupby(key)` over `partitions` combined blocks (default: `cluster_partitions()`)."""
    partitions = partitions or cluster_partitions()
    return ds.repartition(partitions).groupby(key, num_partitions=partitions)


def node_cpus() -> int:
    """CPUs of the largest node (of this machine before Ray starts)."""
    if not ray.is_initialized():
        return os.cpu_count() or 1
    return max(1, max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1))
