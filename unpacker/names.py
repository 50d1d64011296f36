"""What a member's name or link target may be, and the normal form of a name."""

import re

from unpacker.limits import Limits

COMPONENT_MAX = 255
PATH_MAX = 4095

# C0 controls, DEL and C1 controls: log and terminal injection, line-based tools.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class PathError(ValueError):
    """A name or link target failed a check; the caller adds the member to the message."""


def normalize(name: str, utf8: bool, is_dir: bool, limits: Limits) -> str:
    """Return the normalised relative path of `name`, or raise PathError saying why not."""
    if not utf8:
        raise PathError("name is not valid utf-8")
    if _CONTROL.search(name):
        raise PathError("control character in name")
    if name.startswith("/"):
        raise PathError("absolute name refused")
    if len(name.encode()) > PATH_MAX:
        raise PathError(f"name longer than {PATH_MAX} bytes")
    if name.endswith("/") and not is_dir:
        raise PathError("trailing '/' on a non-directory")

    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PathError("'..' component refused")
    if any(len(part.encode()) > COMPONENT_MAX for part in parts):
        raise PathError(f"component longer than {COMPONENT_MAX} bytes")
    if len(parts) > limits.max_depth:
        raise PathError(f"depth {len(parts)} exceeds the limit of {limits.max_depth} "
                        "(--max-depth)")
    if not parts and not is_dir:
        raise PathError("empty or '.' name refused for a non-directory")
    return "/".join(parts)


def check_symlink_target(target: str, utf8: bool) -> None:
    """Raise PathError unless `target` may be stored verbatim as a symlink's target."""
    if not target:
        raise PathError("empty symlink target refused")
    if not utf8:
        raise PathError("symlink target is not valid utf-8")
    if _CONTROL.search(target):
        raise PathError("control character in symlink target")
    if len(target.encode()) > PATH_MAX:
        raise PathError(f"symlink target longer than {PATH_MAX} bytes")
