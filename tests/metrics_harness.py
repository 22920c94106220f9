"""Scrape muxd's metrics endpoint, and run a real Prometheus that scrapes it.

``Prometheus`` starts Debian's ``prometheus`` binary on loopback with a
config this harness writes (a short scrape interval, its own storage in the
test's directory) and is ended by its PID. Tests wait for a scrape that
began after their traffic by asking Prometheus' HTTP API for the sample's
own timestamp, never by sleeping.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from daemon_harness import DEFAULT_TIMEOUT, free_port, wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(port: int, path: str = "/metrics", method: str = "GET",
           timeout: float = DEFAULT_TIMEOUT) -> tuple[int, dict[str, str], str]:
    """One request: (status, headers with lower-case names, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read().decode()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, body
    finally:
        conn.close()


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of an exposition text, keyed by name and label set."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items()
               if sample == name and wanted <= have)


def read_metrics(port: int) -> dict:
    status, _, body = scrape(port)
    assert status == 200, status
    return parse(body)


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], interval: str = "250ms") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  scrape_timeout: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: muxd\n"
            "    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n"
        )
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def _get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=DEFAULT_TIMEOUT) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                            timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, timeout, interval=0.1, what="prometheus /-/ready")

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = self._get("/api/v1/query", **params)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        """The one value of an expression that must give exactly one series."""
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def wait_scrape_after(self, since: float, timeout: float = 30.0) -> float:
        """Wait for a successful scrape that started after ``since`` (Unix time);
        return that scrape's timestamp, to evaluate queries at."""
        def scraped() -> float | None:
            # timestamp() gives a sample's own time only when applied to a
            # selector itself (applied to "up == 1" it gives the query's).
            stamps = [float(item["value"][1])
                      for item in self.query('timestamp(up{job="muxd"})')]
            healthy = all(item["value"][1] == "1" for item in self.query('up{job="muxd"}'))
            return min(stamps) if stamps and healthy and min(stamps) > since else None

        return wait_until(scraped, timeout, interval=0.1,  # type: ignore[return-value]
                          what=f"a scrape after {since}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(DEFAULT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(DEFAULT_TIMEOUT)
        self._log.close()


def promtool_check(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=DEFAULT_TIMEOUT)


def wait_settled(port: int, predicate, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Scrape until ``predicate(samples)`` holds (the daemon has seen the traffic)."""
    found = {}

    def check() -> bool:
        found.update(samples=read_metrics(port))
        return bool(predicate(found["samples"]))

    try:
        wait_until(check, timeout, interval=0.05, what="the metrics to settle")
    except AssertionError:
        raise AssertionError(f"metrics never settled: {found.get('samples')}") from None
    return found["samples"]


def now() -> float:
    return time.time()
