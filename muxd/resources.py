"""RLIMIT_NOFILE: raise the soft limit to what the configuration asks for.

systemd starts services with a soft limit of 1024 for the sake of programs
that use select() (systemd v240 NEWS) and asks the rest to raise it
themselves. We raise it, never lower it, and stop at the hard limit.
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger("muxd")


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward ``wanted``; return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            logger.warning("cannot raise RLIMIT_NOFILE to %d: %s", target, err)
    if wanted > soft:
        logger.warning(
            "RLIMIT_NOFILE is %d, below nofile = %d: the hard limit is %s "
            "(raise it, e.g. LimitNOFILE= in the unit)",
            soft, wanted, "unlimited" if hard == resource.RLIM_INFINITY else hard,
        )
    logger.info("RLIMIT_NOFILE: %d open files (hard limit %s)", soft,
                "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return soft
