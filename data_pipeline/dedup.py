"""Cross-partition exact-duplicate detection: one tiny Ray actor owns the set of seen pixel hashes
(or, for an ingest run in the driver without Ray, a plain object).

It lives in its own light module so the actor's process imports only Ray, not the image and tar
stack the ingest tasks need (starting it is then a fraction of a second, not seconds).
"""

from __future__ import annotations

import ray


class HashOwners:
    """Which ``(partition, index)`` first claimed each pixel hash; first claim wins.

    A retried task may re-claim its own samples (same owner), so a Ray retry is not a duplicate.
    """

    def __init__(self, owners: dict[str, tuple[int, int]]) -> None:
        self.owners = dict(owners)

    def claim(self, requests: list[tuple[str, int, int]]) -> list[bool]:
        return [self.owners.setdefault(digest, (p, i)) == (p, i) for digest, p, i in requests]


# The same bookkeeping as one Ray actor that every partition task of an ingest asks.
HashRegistry = ray.remote(num_cpus=0)(HashOwners)


def claim_hashes(registry, requests: list[tuple[str, int, int]]) -> list[bool]:
    """Ask ``registry``: a :class:`HashOwners` in this process (in-process ingest) or the actor."""
    if isinstance(registry, HashOwners):
        return registry.claim(requests)
    return ray.get(registry.claim.remote(requests))
