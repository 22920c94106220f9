"""RLIMIT_NOFILE: raise the soft limit to what the configuration asks for.

systemd starts services with a soft limit of 1024 for the sake of programs
that use select() (systemd v240 NEWS) and asks the rest to raise it
themselves. We raise it, never lower it, and stop at the hard limit.

When the hard limit is below ``[limits] nofile``, the warning says where that
hard limit comes from as far as muxd can tell, without advice that would not
help: it compares the limits it was started with. Under systemd
(``$INVOCATION_ID``), a soft limit equal to the hard one means the unit set
both (``LimitNOFILE=N`` does; systemd's default leaves soft at 1024), so the
unit already asks and what caps it is systemd's own hard limit (a container's
or PAM's): saying "set LimitNOFILE=" there would send the operator in a circle.
"""

from __future__ import annotations

import logging
import os
import resource

logger = logging.getLogger("muxd")

# The limits muxd was started with (the first call, at start): a reload sees
# the soft limit muxd itself raised, which says nothing about the unit.
_started_with: tuple[int, int] | None = None


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward ``wanted``; return the limit in force."""
    global _started_with
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _started_with is None:
        _started_with = (soft, hard)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            logger.warning("cannot raise RLIMIT_NOFILE to %d: %s", target, err)
    if wanted > soft and hard != resource.RLIM_INFINITY and hard < wanted:
        logger.warning("RLIMIT_NOFILE: [limits] nofile asks for %d open files but the hard "
                       "limit is %s, which muxd cannot raise: %s; serving with at most %d",
                       wanted, _limit(hard), _hard_limit_origin(*_started_with), soft)
    logger.info("RLIMIT_NOFILE: %d open files (hard limit %s)", soft, _limit(hard))
    return soft


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def _hard_limit_origin(soft: int, hard: int) -> str:
    if not os.environ.get("INVOCATION_ID"):
        return ("it is the hard limit of whatever started muxd (ulimit -Hn in a shell; "
                "limits.conf under PAM; a container's own)")
    if soft == hard:
        return ("the unit's LimitNOFILE= set it, to its own value or, if that is higher, to "
                "systemd's own hard limit (in a container, or set by PAM)")
    return ("the unit sets no LimitNOFILE= (systemd's default soft limit is 1024): set it, "
            "up to systemd's own hard limit (a container's or PAM's)")
