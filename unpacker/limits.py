"""Caps that bound what one extraction may create; a cap exceeded is a refusal naming it."""

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Configurable extraction caps (security.md section 2.5).

    `max_total_bytes` bounds the sum of regular-file sizes, `max_members` the number of tar
    members, `max_depth` the number of components in a path, and `max_member_size` the size of
    any one regular file. Sizes are the declared ones, checked before anything is written.
    """

    max_total_bytes: int = 16 * GiB
    max_members: int = 200_000
    max_depth: int = 128
    max_member_size: int = 4 * GiB
