"""Reload (SIGHUP): read the configuration again and apply what can change while serving.

Owns the rule of what a reload may change: everything but the fields in
``RESTART_ONLY_FIELDS``, which are logged as needing a restart and kept; an
invalid file changes nothing; a stopping daemon does not reload. Around it,
the notify protocol's RELOADING=1 (with MONOTONIC_USEC) and READY=1.

Of the shared state it may: replace ``config``, ``access`` and the UDP guard's
settings, regroup the per-client counts (and each connection's ``group``)
when the per-client limit changed, raise RLIMIT_NOFILE, and ask housekeeping
to reschedule itself when ``idle_timeout`` changed (through the callback it
is given). It never opens or closes a descriptor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from muxd.access import AccessPolicy, client_address, client_group
from muxd.config import (
    RESTART_ONLY_FIELDS,
    Config,
    ConfigError,
    changed_fields,
    describe_changes,
    key_name,
    load_config,
)
from muxd.logs import set_level
from muxd.report import status
from muxd.resources import raise_nofile
from muxd.state import Shared

logger = logging.getLogger("muxd")



def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The rule of a reload (the single process's and the supervisor's): ``new`` with
    every field of ``RESTART_ONLY_FIELDS`` at its running value, logged once at
    warning when one changed; with the fields applied and those left for a restart."""
    needs_restart = [name for name in RESTART_ONLY_FIELDS
                     if getattr(old, name) != getattr(new, name)]
    if needs_restart:
        logger.warning("reload: %s changed in %s; that takes effect only after a restart",
                       ", ".join(map(key_name, needs_restart)), new.source)
        new = replace(new, **{name: getattr(old, name) for name in RESTART_ONLY_FIELDS})
    applied = [name for name in changed_fields(old, new) if name != "source"]
    return new, applied, needs_restart

class Reload:
    def __init__(self, shared: Shared, idle_timeout_changed: Callable[[], None]) -> None:
        self.shared = shared
        self._idle_timeout_changed = idle_timeout_changed
        # For the metrics: loads by result; the start counts as a success.
        self.results = {"success": 0, "failure": 0}
        self.last_success = time.time()

    def __call__(self) -> None:
        shared = self.shared
        if shared.stopping:
            # systemd has been told STOPPING=1: a RELOADING=1 and READY=1 now
            # would tell it the service is up again while it drains to exit.
            logger.info("SIGHUP while stopping: not reloading")
            return
        shared.notifier.reloading()
        old = shared.config
        try:
            new = load_config(shared.config_path)
        except ConfigError as err:
            logger.error("reload failed, keeping the running configuration: %s", err)
            self.results["failure"] += 1
            shared.notifier.ready(status(shared))
            return
        new, applied, needs_restart = keep_restart_only(old, new)
        shared.config = new
        self.results["success"] += 1
        self.last_success = time.time()
        set_level(new.log_level)
        shared.access = AccessPolicy.from_config(new)
        shared.udp_guard.configure(new, shared.access)
        if (new.max_connections_per_ip, new.ipv6_prefix) != (
                old.max_connections_per_ip, old.ipv6_prefix):
            self._regroup_clients()
        if new.nofile > old.nofile:
            raise_nofile(new.nofile)
        if new.idle_timeout != old.idle_timeout:
            self._idle_timeout_changed()
        logger.info("reloaded %s: %s", new.source, describe_changes(applied, needs_restart))
        shared.notifier.ready(status(shared))

    def _regroup_clients(self) -> None:
        """Count open connections under the per-client limit as it now stands
        (a limit switched on by a reload counts the clients already here)."""
        shared = self.shared
        per_client = shared.per_client
        per_client.clear()
        config = shared.config
        limited = bool(config.max_connections_per_ip)
        for conn in shared.conns.values():
            conn.group = None
            if not limited:
                continue
            try:
                # Behind a balancer the socket's peer is the balancer; the
                # client its header named is kept in conn.client (proxy_wait.py,
                # or taken over with it): () when it named none, counted under
                # no client, as admission did.
                client = conn.client
                host = conn.sock.getpeername()[0] if client is None else \
                    client[0] if client else None
            except (OSError, IndexError, TypeError):
                continue
            if host:
                conn.group = client_group(client_address(host), config.ipv6_prefix)
                per_client[conn.group] = per_client.get(conn.group, 0) + 1
