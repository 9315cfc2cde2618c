"""The bench's reading of wrk's summary (bench/loadgen.py `parse_wrk`): pure, no wrk run.

The texts are wrk 4.1's own output (Debian bookworm); the tool's end-to-end test runs
wrk for real through every data-plane contender."""

from __future__ import annotations

import pytest
from kube_proxy_py_bench.loadgen import parse_wrk, wrk_argv

CLEAN = """Running 1s test @ http://127.0.0.1:8080/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.40ms    1.34ms  10.58ms   69.52%
    Req/Sec     1.35k   105.33     1.44k    80.00%
  1342 requests in 1.00s, 0.96MB read
Requests/sec:   1341.37
Transfer/sec:      0.96MB"""

WITH_ERRORS = """Running 5s test @ http://198.19.0.10:80/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.01ms    2.10ms  40.11ms   90.00%
    Req/Sec    11.20k   600.00    12.00k    70.00%
  55821 requests in 5.00s, 4.21MB read
  Socket errors: connect 3, read 7, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:  11164.20
Transfer/sec:    861.61KB
"""


def test_rate_count_and_duration_are_read() -> None:
    r = parse_wrk(CLEAN)
    assert r == {"conns": 1342, "errors": 0, "seconds": 1.0, "per_second": 1341.37}


def test_socket_errors_and_bad_statuses_are_counted() -> None:
    r = parse_wrk(WITH_ERRORS)
    assert r["conns"] == 55821 and r["per_second"] == 11164.2
    assert r["errors"] == 3 + 7 + 0 + 2 + 4


def test_other_text_is_an_error_not_a_zero() -> None:
    with pytest.raises(ValueError, match="not wrk's summary"):
        parse_wrk("unable to connect to 198.19.0.10:80 Connection refused")


def test_every_request_is_a_new_connection_on_one_thread() -> None:
    argv = wrk_argv("198.19.0.10", 80, 0.5, 64)
    assert argv[:4] == ["wrk", "-t1", "-c64", "-d1s"]  # whole seconds, at least one
    assert argv[4:6] == ["-H", "Connection: close"]
    assert argv[-1] == "http://198.19.0.10:80/"
