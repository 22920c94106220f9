"""The Prometheus endpoint (``[metrics] listen``): what it answers, what a real
Prometheus reads from it, and what hostile scrapers cannot do to echo.

A real ``prometheus`` (Debian's package; ``.ci/run`` installs it) scrapes
muxd while the test makes known traffic, and its HTTP API must give exactly
those figures; ``promtool check metrics`` must accept the exposition.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import (
    DEFAULT_TIMEOUT,
    EchoProbe,
    connect,
    connect_slow_reader,
    echo_once,
    free_port,
    push_until_stalled,
    raw_exchange,
    recv_until_eof,
    sees_connection_end,
    wait_fds,
    wait_until,
)
from fake_systemd import Unit
from metrics_harness import (
    PROMETHEUS,
    PROMTOOL,
    Prometheus,
    parse,
    promtool_check,
    read_metrics,
    scrape,
    total,
    wait_settled,
)

import muxd
from muxd.handover import decode_state
from muxd.metrics import Figures, ListenerFigures, ServiceFigures, render
from muxd.metrics_http import MAX_SCRAPERS, REQUEST_TIMEOUT

needs_prometheus = pytest.mark.skipif(
    not (Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()),
    reason="prometheus/promtool absent (apt-get install prometheus; .ci/run installs it)",
)


def metrics_config(port: int, metrics_port: int, backend: str = "auto", *,
                   extra: str = "") -> str:
    return (f"[server]\nlisten = 127.0.0.1:{port}\nbackend = {backend}\n{extra}"
            f"[metrics]\nlisten = 127.0.0.1:{metrics_port}\n")


def test_get_metrics_is_the_exposition_with_its_content_type(start_muxd, backend) -> None:
    port, metrics_port = free_port(), free_port()
    start_muxd(metrics_config(port, metrics_port, backend))
    status, headers, body = scrape(metrics_port)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["connection"] == "close"
    samples = parse(body)
    assert samples[("muxd_build_info", frozenset({("version", muxd.__version__)}))] == 1
    assert samples[("muxd_connections_open", frozenset({("listener", f"127.0.0.1:{port}")}))] == 0
    # No file descriptor store (not under systemd): no hand-over, none of its series.
    assert not [name for name, _ in samples if name.startswith("muxd_handover_")]


def test_other_paths_methods_and_garbage_get_404_405_400_then_close(start_muxd, backend) -> None:
    port, metrics_port = free_port(), free_port()
    start_muxd(metrics_config(port, metrics_port, backend))
    assert scrape(metrics_port, "/")[0] == 404
    assert scrape(metrics_port, "/metrics/x")[0] == 404
    status, headers, _ = scrape(metrics_port, method="POST")
    assert (status, headers.get("allow")) == (405, "GET")
    assert scrape(metrics_port, method="HEAD")[0] == 405
    for garbage in (b"\x00\xff\xfe garbage\r\n\r\n", b"GET /metrics HTTP/1.1\r\n\r\n",  # no Host
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n"):
        answer = raw_exchange(metrics_port, garbage)
        assert answer.startswith(b"HTTP/1.1 400 "), (garbage, answer)
    # HTTP/1.0 is HTTP too; the query string is ignored.
    answer = raw_exchange(metrics_port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"muxd_build_info" in answer
    # Pipelined: exactly one answer, then the end of the connection.
    answer = raw_exchange(metrics_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    assert answer.count(b"HTTP/1.1 200 OK") == 1 and answer.endswith(b"\n")
    samples = read_metrics(metrics_port)
    assert total(samples, "muxd_metrics_requests_total", code="404") == 2
    assert total(samples, "muxd_metrics_requests_total", code="405") == 2
    assert total(samples, "muxd_metrics_requests_total", code="400") == 3


@needs_prometheus
def test_promtool_accepts_the_exposition(start_muxd) -> None:
    port, metrics_port, udp_port = free_port(), free_port(), free_port(socket.AF_INET)
    start_muxd(metrics_config(port, metrics_port, extra=f"udp = 127.0.0.1:{udp_port}\n"))
    with connect(port) as client:
        assert echo_once(client, b"x" * 100) == b"x" * 100
    _, _, body = scrape(metrics_port)
    checked = promtool_check(body)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "process_resident_memory_bytes" in body and "muxd_udp_datagrams_dropped_total" in body


@needs_prometheus
def test_label_values_are_escaped(tmp_path: Path) -> None:
    # A listener is named by its address, but an inherited socket's name
    # comes from LISTEN_FDNAMES: any text must come out as a valid label.
    figures = Figures(listeners={'odd "name" \\ with\nnewline': ListenerFigures(accepted=1)})
    text = render(ServiceFigures(version="1"), [(None, figures)], [])
    checked = promtool_check(text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert ('muxd_connections_accepted_total{listener="odd \\"name\\" \\\\ with\\nnewline"} 1'
            in text.splitlines())


def _connect_from(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(DEFAULT_TIMEOUT)
    sock.bind((host, 0))
    sock.connect(("127.0.0.1", port))
    return sock


@needs_prometheus
def test_prometheus_reads_exactly_the_traffic_made(start_muxd, tmp_path: Path) -> None:
    port, metrics_port, udp_port = free_port(), free_port(), free_port(socket.AF_INET)
    listener = f"127.0.0.1:{port}"
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{metrics_port}"])
    try:
        config = (f"[server]\nlisten = {listener}\nudp = 127.0.0.1:{udp_port}\n"
                  "[limits]\nmax_connections = 3\nudp_rate = 0\nudp_total_rate = 0\n"
                  "[access]\ndeny = 127.0.0.2\n"
                  f"[metrics]\nlisten = 127.0.0.1:{metrics_port}\n")
        started = time.time()
        daemon = start_muxd(config)
        prometheus.wait_ready()
        # A first scrape before the traffic (Prometheus starts scraping a few
        # seconds after it is ready), so rates and increases have a start.
        prometheus.wait_scrape_after(0)

        # 5 connections, one after another, 1000..5000 bytes each: eof.
        sent = 0
        for index in range(5):
            payload = os.urandom(1000 * (index + 1))
            with connect(port) as client:
                assert echo_once(client, payload) == payload
            sent += len(payload)
        # 1 refused by [access]; 3 held (the limit), 100 bytes each; 2 more
        # refused by max_connections; then the 3 close: eof.
        with _connect_from("127.0.0.2", port) as denied:
            assert sees_connection_end(denied)
        held = [connect(port) for _ in range(3)]
        for client in held:
            assert echo_once(client, b"h" * 100) == b"h" * 100
            sent += 100
        for _ in range(2):
            with connect(port) as refused:
                assert sees_connection_end(refused)
        for client in held:
            client.close()
        # One stays open through the scrape: live connections' bytes count too
        # (once muxd has seen the 3 go, or the limit would refuse it).
        wait_settled(metrics_port, lambda samples: total(samples, "muxd_connections_open") == 0)
        kept = connect(port)
        assert echo_once(kept, b"k" * 777) == b"k" * 777
        sent += 777
        # UDP: 4 echoed from 127.0.0.1, 3 dropped from 127.0.0.2 (denied).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(DEFAULT_TIMEOUT)
            for index in range(4):
                udp.sendto(b"d%d" % index, ("127.0.0.1", udp_port))
                assert udp.recvfrom(100)[0] == b"d%d" % index
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.2", 0))
            for _ in range(3):
                udp.sendto(b"dropped", ("127.0.0.1", udp_port))
        # The metrics endpoint obeys [access] too.
        with _connect_from("127.0.0.2", metrics_port) as scraper:
            scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert scraper.recv(100) == b""  # closed unanswered (or reset)
            except ConnectionResetError:
                pass
        # A good reload, then a bad one.
        before_reload = time.time()
        daemon.write_config(config.replace("[access]", "[logging]\nlevel = warning\n[access]"))
        daemon.signal(signal.SIGHUP)
        daemon.notify.wait_for("READY", "1")
        after_reload = time.time()
        daemon.write_config("[server]\nlisten = nowhere\n")
        daemon.signal(signal.SIGHUP)
        daemon.notify.wait_for("READY", "1")

        def seen_everything(samples: dict) -> bool:
            return (total(samples, "muxd_connections_closed_total") == 11
                    and total(samples, "muxd_received_bytes_total") == sent
                    and total(samples, "muxd_udp_datagrams_dropped_total") == 3
                    and total(samples, "muxd_config_reloads_total") == 2)

        wait_settled(metrics_port, seen_everything)
        at = prometheus.wait_scrape_after(time.time())

        def value(expr: str) -> float:
            return prometheus.value(expr, at)

        where = f'listener="{listener}"'
        assert value(f"muxd_connections_accepted_total{{{where}}}") == 12
        assert value(f"muxd_connections_open{{{where}}}") == 1
        closed = {reason: value(f'muxd_connections_closed_total{{{where},reason="{reason}"}}')
                  for reason in ("eof", "reset", "idle", "limit", "shutdown", "access")}
        assert closed == {"eof": 8, "reset": 0, "idle": 0, "limit": 2, "shutdown": 0,
                          "access": 1}
        assert value(f'muxd_connections_refused_total{{{where},reason="max_connections"}}') == 2
        assert value(f'muxd_connections_refused_total{{{where},reason="access"}}') == 1
        assert value("sum(muxd_connections_refused_total)") == 3
        assert value(f"muxd_received_bytes_total{{{where}}}") == sent
        assert value(f"muxd_sent_bytes_total{{{where}}}") == sent
        assert value("muxd_udp_datagrams_echoed_total") == 4
        assert value('muxd_udp_datagrams_dropped_total{reason="access"}') == 3
        assert value("sum(muxd_udp_datagrams_dropped_total)") == 3
        assert value('muxd_config_reloads_total{result="success"}') == 1
        assert value('muxd_config_reloads_total{result="failure"}') == 1
        assert before_reload <= value("muxd_config_last_reload_success_timestamp_seconds") \
            <= after_reload
        assert value('muxd_metrics_connections_refused_total{reason="access"}') == 1
        assert value(f'muxd_build_info{{version="{muxd.__version__}"}}') == 1
        assert started - 2 <= value("process_start_time_seconds") <= time.time()
        assert value("process_open_fds") == daemon.open_fds() + 1  # + the scrape's
        assert abs(value("process_resident_memory_bytes") - daemon.rss_bytes()) < 8 << 20
        assert value("process_max_fds") >= 1024
        assert value("process_cpu_seconds_total") > 0
        # A query an operator would use: connections by reason over 5 minutes.
        by_reason = prometheus.query("sum by (reason) (increase(muxd_connections_closed_total"
                                     "[5m]))", at)
        increased = {item["metric"]["reason"] for item in by_reason
                     if float(item["value"][1]) > 0}
        assert increased == {"eof", "limit", "access"}, by_reason
        kept.close()
    finally:
        prometheus.close()


def test_hostile_scrapers_never_delay_echo_nor_grow_memory(start_muxd, backend) -> None:
    port, metrics_port = free_port(), free_port()
    daemon = start_muxd(metrics_config(port, metrics_port, backend))
    idle_fds = daemon.open_fds()  # the probe has stopped when this is checked
    probe = EchoProbe(port, max_stall=0.1, max_size=4096, seed=13).start()
    wait_until(lambda: probe.verified or probe.failures, what="the probe's first echo")
    for _ in range(3):
        assert scrape(metrics_port)[0] == 200  # warm up before measuring memory
    rss_before = daemon.rss_bytes()
    # A never-reader: asks, reads nothing, never closes; held to the end.
    # It and the slowloris come from addresses of their own, so that only
    # their deadlines end them (the hostile clients' address, beyond its
    # places, would take theirs back first).
    never_reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    never_reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    never_reader.bind(("127.0.0.4", 0))
    never_reader.connect(("127.0.0.1", metrics_port))
    never_reader.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    # A slowloris: half a request line, then nothing; timed out, never answered.
    slowloris = socket.create_connection(("127.0.0.1", metrics_port),
                                         source_address=("127.0.0.3", 0))
    slowloris.sendall(b"GET /metr")
    hostile = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "hostile_scrapers.py"), str(metrics_port),
         str(REQUEST_TIMEOUT)], stdout=subprocess.PIPE,
        # The attacker would have CPUs of its own; here it must not take the
        # echo probe's or muxd's share of the two cores.
        preexec_fn=lambda: os.nice(10))
    rss_peak = rss_before
    began = time.monotonic()
    try:
        while hostile.poll() is None:
            assert time.monotonic() - began < REQUEST_TIMEOUT + 30, "hostile clients hang"
            rss_peak = max(rss_peak, daemon.rss_bytes())
            time.sleep(0.05)  # sampling memory, not synchronising
    finally:
        if hostile.poll() is None:
            hostile.kill()
        output = hostile.communicate(timeout=DEFAULT_TIMEOUT)[0]
    results = json.loads(output)
    assert not results["unfinished"], results
    probe.stop()
    assert not probe.failures, probe.failures
    assert probe.verified > 0 and probe.worst_latency < 0.1, probe.worst_latency
    # Each bad client got its proper answer or, when the endpoint's few
    # places were taken, was closed at once (an RST, as it had sent input);
    # none was left hanging.
    refused_at_once = ("<reset>", "", "ConnectionResetError", "BrokenPipeError")
    assert results["garbage"] in ("HTTP/1.1 400", *refused_at_once), results
    assert results["huge_header"] in ("HTTP/1.1 400", *refused_at_once), results
    assert results["no_crlf"][0] == "ended" and results["http09"][0] == "ended", results
    assert results["pipelined"] in (0, 1), results
    _, ended, pending = results["flood"]  # type: ignore[misc]
    assert pending == 0 and ended == 500, results["flood"]
    # The never-reader (still open here) was dropped by its deadline.
    wait_fds(daemon, idle_fds, timeout=REQUEST_TIMEOUT + 3)
    never_reader.close()
    assert sees_connection_end(slowloris, timeout=0.1)  # ended already
    slowloris.close()
    # 4 x 4 MiB headers and 500 connections cost a bounded, small amount.
    assert rss_peak - rss_before < 8 << 20, (rss_before, rss_peak)
    # And the endpoint answers afterwards, at once.
    assert scrape(metrics_port)[0] == 200
    samples = read_metrics(metrics_port)
    # Beyond one client's places, its oldest connections made room (evicted).
    assert total(samples, "muxd_metrics_connections_refused_total", reason="evicted") > 0
    assert total(samples, "muxd_metrics_connections_refused_total", reason="timeout") >= 1
    assert MAX_SCRAPERS < 500


def test_huge_request_heads_cost_bounded_memory(start_muxd) -> None:
    port, metrics_port = free_port(), free_port()
    daemon = start_muxd(metrics_config(port, metrics_port))
    for _ in range(3):
        assert scrape(metrics_port)[0] == 200  # warm up before measuring memory
    rss_before = daemon.rss_bytes()
    outcomes: list[object] = []

    def huge_head(source: str) -> None:
        # Fewer clients than the endpoint's places, each from an address of
        # its own (one client holds at most MAX_PER_CLIENT): each is read,
        # none refused.
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=10,
                                      source_address=(source, 0)) as sock:
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20))
                outcomes.append(recv_until_eof(sock)[:12])
            except OSError as err:
                outcomes.append(type(err).__name__)

    clients = [threading.Thread(target=huge_head, args=(f"127.0.0.{index + 1}",))
               for index in range(MAX_SCRAPERS - 2)]
    for client in clients:
        client.start()
    rss_peak = rss_before
    while any(client.is_alive() for client in clients):
        rss_peak = max(rss_peak, daemon.rss_bytes())
        time.sleep(0.02)  # sampling memory, not synchronising
    # 6 x 8 MiB sent; what muxd held of it is bounded by MAX_REQUEST_BYTES each.
    assert rss_peak - rss_before < 4 << 20, (rss_before, rss_peak)
    assert outcomes == [b"HTTP/1.1 400"] * len(clients), outcomes


def test_handover_metrics_count_what_was_taken_over_and_what_could_not_be_kept(
        pid1, start_muxd, tmp_path: Path) -> None:
    """With the test as PID 1 (fake_systemd.py): a muxd whose soft RLIMIT_NOFILE (128)
    lets it park 96 connections (descriptors in flight stay under it, a quarter kept
    back for replacing parking sockets), 97 clients, one of them owed echo; then a
    restart. Before it, the one not parked; after it, what the new process took over
    (the bytes: exactly the pending echo in the state the old one handed over) and
    the one the old process had to close; after a second restart, those counted on."""
    port, metrics_port = free_port(), free_port()
    config = metrics_config(port, metrics_port, extra="[limits]\nbuffer_size = 65536\n")
    unit = Unit(pid1, start_muxd, config, tmp_path, nofile=(128, 128))

    def handover() -> dict[str, float]:
        """Every muxd_handover_* series, by name (and reason) without the prefix."""
        return {name.removeprefix("muxd_handover_") + "".join(f"_{v}" for _, v in labels): value
                for (name, labels), value in read_metrics(metrics_port).items()
                if name.startswith("muxd_handover_")}

    nothing = {"connections_total": 0, "bytes_total": 0, "lost_connections_total": 0,
               "unstored_connections_total_store_full": 0,
               "unstored_connections_total_store_error": 0,
               "unstored_connections_open": 0}
    assert handover() == nothing
    fillers = [connect(port) for _ in range(94)]
    for sock in fillers:
        assert echo_once(sock, b"f") == b"f"
    talker = connect(port)
    assert echo_once(talker, b"stored") == b"stored"
    slow = connect_slow_reader(port)
    push_until_stalled(slow, os.urandom(16 << 20))
    wait_until(lambda: pid1.parked() == 96, what="96 connections parked")
    beyond = connect(port)
    assert echo_once(beyond, b"not stored") == b"not stored"
    assert handover() == {
        **nothing, "unstored_connections_total_store_full": 1, "unstored_connections_open": 1}

    unit.hand_over()
    pending = decode_state(pid1.read("state-")).pending_bytes
    assert pending > 0
    unit.start()
    assert sees_connection_end(beyond)  # closed by the old process: it was not kept
    assert handover() == {
        **nothing, "connections_total": 96, "bytes_total": pending, "lost_connections_total": 1}
    assert echo_once(talker, b"kept") == b"kept"
    # Once more: the counters go on from the previous process's, never back (a
    # restart that takes over as many as the last would otherwise look to
    # increase() like no change at all).
    unit.hand_over()
    pending += decode_state(pid1.read("state-")).pending_bytes
    unit.start()
    assert handover() == {
        **nothing, "connections_total": 192, "bytes_total": pending, "lost_connections_total": 1}
    if Path(PROMTOOL).exists():
        checked = promtool_check(scrape(metrics_port)[2])
        assert checked.returncode == 0, checked.stdout + checked.stderr
    for sock in (talker, slow, beyond, *fillers):
        sock.close()


def test_workers_report_the_whole_service_on_one_endpoint(start_muxd) -> None:
    port, metrics_port = free_port(), free_port()
    start_muxd(metrics_config(port, metrics_port, extra="workers = 2\n"))
    clients = 40
    for index in range(clients):
        with connect(port) as client:
            payload = b"w" * (100 + index)
            assert echo_once(client, payload) == payload
    expected_bytes = sum(100 + index for index in range(clients))
    samples = wait_settled(metrics_port, lambda s: total(
        s, "muxd_connections_closed_total", reason="eof") == clients)
    assert total(samples, "muxd_connections_accepted_total") == clients
    assert total(samples, "muxd_received_bytes_total") == expected_bytes
    assert total(samples, "muxd_sent_bytes_total") == expected_bytes
    assert total(samples, "muxd_connections_open") == 0
    workers = {dict(labels)["worker"] for name, labels in samples
               if name == "muxd_connections_accepted_total"}
    assert workers == {"0", "1"}
    # Each worker served some of them (SO_REUSEPORT spreads by source port).
    for worker in workers:
        assert total(samples, "muxd_connections_accepted_total", worker=worker) > 0
    processes = {dict(labels).get("worker") for name, labels in samples
                 if name == "process_resident_memory_bytes"}
    assert processes == {"0", "1", "supervisor"}
    assert total(samples, "muxd_build_info") == 1
    _, _, body = scrape(metrics_port)
    if Path(PROMTOOL).exists():
        checked = promtool_check(body)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_busy_metrics_port_fails_the_start_clearly(start_muxd) -> None:
    port, metrics_port = free_port(), free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", metrics_port))
        squatter.listen()
        daemon = start_muxd(metrics_config(port, metrics_port), ready=False)
        assert daemon.wait() == 69  # EX_UNAVAILABLE, as for any listener; not 78
    assert f"[metrics] cannot listen on 127.0.0.1:{metrics_port}: address already in use" \
        in daemon.log
    assert "Traceback" not in daemon.log


def test_metrics_off_by_default_binds_nothing_more(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(f"[server]\nlisten = 127.0.0.1:{port}\n")
    listening = [line for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[3] == "0A"]
    inode_of_daemon = {os.readlink(f"/proc/{daemon.pid}/fd/{fd}")
                       for fd in os.listdir(f"/proc/{daemon.pid}/fd")}
    ours = [line for line in listening
            if f"socket:[{line.split()[9]}]" in inode_of_daemon]
    assert len(ours) == 1, ours
    wait_until(lambda: daemon.process.poll() is None)
