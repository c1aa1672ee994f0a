"""Reliability and security under faults and load: bench/reliability.py's checks, asserted on what they measured
(status codes, counts, seconds, addresses), not only on the verdict the check computed.

Security checks and a short soak run against the session's ``server``; checks that break or restart
a server (kill a worker, scale, stop/start, slow request, corrupt .mar) get servers of their own.
The default run is a reduced version (about 3 minutes on 2 idle cores: 15 s soak, scale 1 -> 2 -> 1,
one short run of the repeated scaling check, one stop/start cycle, two kinds of corrupt .mar).
``CIFAR3_RELIABILITY_FULL=1`` runs the full one (60 s soak, scale 1 -> 4 -> 1 both synchronous and not,
3 cycles, every corruption); the script runs it all with a 5-minute soak and writes reports/reliability.md.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import stat
import subprocess
import sys

import psutil
import pytest
import requests
from conftest import start_server, write_server_config

from bench.reliability import common, faults, scaling, security, soak
from cifar3_client.server import Server, ServerError, read_properties

FULL = os.environ.get("CIFAR3_RELIABILITY_FULL") == "1"
full_only = pytest.mark.skipif(not FULL, reason="full reliability run: set CIFAR3_RELIABILITY_FULL=1")
pytestmark = pytest.mark.server


def assert_passed(rows: list[dict], only: str | None = None) -> None:
    checked = [r for r in rows if only is None or only in r["check"]]
    assert checked, f"no result row matching {only!r}"
    failed = [r for r in checked if not r["passed"]]
    assert not failed, "\n".join(f"{r['check']}: expected {r['expected']}; measured {r['measured']}" for r in failed)


def row(rows: list[dict], text: str) -> dict:
    return next(r for r in rows if text in r["check"])


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def payload() -> bytes:
    return common.sample_png()


@pytest.fixture(scope="module")
def own_server(tmp_path_factory, model_store):
    """A server this module may kill workers of, scale, stop and start."""
    srv = start_server(tmp_path_factory.mktemp("reliability-server"), model_store)
    yield srv
    srv.stop()


# -- security (session server) ------------------------------------------------------------------


def test_every_listening_socket_is_on_loopback(server):
    (checked,) = security.check_loopback(server)
    assert_passed([checked])
    addresses = [a.rsplit(":", 1) for a in checked["addresses"]]
    assert all(ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback for ip, _ in addresses), addresses
    urls = (server.inference_url, server.management_url, server.metrics_url)
    assert {port(url) for url in urls} <= {int(p) for _, p in addresses}


def test_calls_without_or_with_a_wrong_token_are_refused(server, payload):
    (checked,) = security.check_tokens(server, payload)
    assert_passed([checked])
    assert len(checked["answers"]) == 9 and checked["good"] == [200, 200]
    for case, (status, body) in checked["answers"].items():
        assert status == 400 and "InvalidKeyException" in body, (case, status, body)


def test_key_file_is_readable_by_its_owner_only(server):
    assert_passed(security.check_key_file(server))
    assert stat.S_IMODE(server.key_file.stat().st_mode) == 0o600


def test_the_metrics_api_needs_no_key_and_new_keys_need_the_api_key(own_server):
    """What docs/serving.md says of TorchServe 0.12's keys: metrics answer without one; the token API replaces a
    key only for key_file.json's API key, and the replaced key is refused from then on."""
    assert requests.get(f"{own_server.metrics_url}/metrics", timeout=30).status_code == 200
    keys = {api: entry["key"] for api, entry in json.loads(own_server.key_file.read_text()).items()}

    def call(url: str, key: str, **params) -> requests.Response:
        return requests.get(url, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    token_api, ping = f"{own_server.management_url}/token", f"{own_server.inference_url}/ping"
    for refused in ("management", "inference"):
        answer = call(token_api, keys[refused], type="inference")
        assert answer.status_code == 400 and "InvalidKeyException" in answer.text
    assert call(token_api, keys["API"], type="inference").status_code == 200
    new = json.loads(own_server.key_file.read_text())["inference"]["key"]
    assert new != keys["inference"]
    assert call(ping, keys["inference"]).status_code == 400 and call(ping, new).status_code == 200


def test_model_registration_and_removal_are_refused(server):
    (checked,) = security.check_model_api(server)
    assert_passed([checked])
    assert len(checked["answers"]) == 3 and set(checked["answers"].values()) == {405}
    assert server.client().describe()["modelName"] == "cifar3"  # still served


def test_allowed_urls_admits_no_remote_url(server):
    assert_passed(security.check_allowed_urls(server))
    patterns = [p.strip() for p in read_properties(server.config)["allowed_urls"].split(",") if p.strip()]
    assert patterns and not any(re.fullmatch(p, "https://example.com/x.mar") for p in patterns)


def test_oversized_upload_is_refused(server):
    (checked,) = security.check_request_size(server)
    assert_passed([checked])
    assert checked["limit"] == int(read_properties(server.config)["max_request_size"])
    assert checked["status"] in (413, 0)  # 0: the connection was closed before the whole body was read


def test_a_malformed_request_fails_alone_not_its_batch(server, payload):
    (checked,) = security.check_bad_request_in_batch(server, payload, rounds=3)
    assert_passed([checked])
    assert checked["bad_codes"] == [400] * 3 and checked["good_codes"] == [200] * 3 * 6


# -- load (session server) ------------------------------------------------------------------------


def test_soak_at_80_percent_of_saturation(server, payload):
    seconds = 60.0 if FULL else 15.0
    rows = soak.check_soak(server, payload, seconds=seconds, saturation_seconds=8.0 if FULL else 5.0,
                          low_seconds=10.0 if FULL else 5.0, sweep=(0.5,) if FULL else (),
                          probe_seconds=1.0)  # fmt: skip
    assert_passed(rows, "saturation")
    assert_passed(rows, "open loop at")  # the soak itself: 0 errors
    assert_passed(rows, "memory growth")
    saturation, soaked = row(rows, "saturation")["load"], row(rows, "open loop at")
    assert saturation["errors"] == 0 and saturation["ok"] > 0 and saturation["rps"] > 0
    assert soaked["load"]["errors"] == 0 and soaked["load"]["requests"] >= 0.5 * soaked["rate"] * seconds
    memory = row(rows, "memory growth")
    assert memory["rss_start"] > 0 and (memory["rss_end"] - memory["rss_start"]) / 2**20 < 50
    latency = next(r for r in rows if r["check"] == "load: soak latency")
    assert latency["machine"]["seconds"] == 1.0 and "machine: plain code ran below 50% speed" in latency["measured"]
    # "p99 <= 2x its low-load value" is measured and reported (the row is in ``rows``; the script's
    # table shows it) but not asserted: on the 2-core VM the host slows plain code to 5-15 % speed in
    # 8-23 % of 10-ms windows (the row's cpuprobe line), and at 80 % load each such episode's backlog
    # takes ~4x its length to drain; the p99 was 2.2-3.9x its low-load value (README, reports/reliability.md).


# -- faults (servers of their own) --------------------------------------------------------------


def test_killing_a_worker_under_load_fails_only_its_requests(own_server, payload):
    rows = faults.check_kill_worker(own_server, payload, before=2.0, after=3.0)
    assert_passed(rows)
    failed = row(rows, "failed requests")
    assert failed["failed"] <= failed["in_flight"] + failed["routed_to_dead"] and failed["load"]["requests"] > 0
    assert row(rows, "recovery")["recovery_s"] <= 10
    assert row(rows, "/ping")["pings"] and set(row(rows, "/ping")["pings"]) == {200}
    later = row(rows, "after recovery")
    assert later["after"] > 0 and later["failed_after"] == 0


def test_scaling_up_and_down_under_load(own_server, payload):
    up = 4 if FULL else 2
    rows = faults.check_scale(own_server, payload, up=up, synchronous=True, settle=2.0)
    assert_passed(rows, f"-> {up} workers under load")  # scale up: 0 failed requests, all READY
    assert_passed(rows, "clients retrying")  # scale down: retrying clients lose nothing
    scaled_up = row(rows, f"-> {up} workers under load")
    assert scaled_up["workers"] == up and scaled_up["load"]["errors"] == 0 and scaled_up["load"]["requests"] > 0
    retrying = row(rows, "clients retrying")["load"]
    assert retrying["errors"] == 0 and retrying["requests"] > 0
    # Plain clients may lose requests on scale-down (TorchServe 0.12 drops the job a stopping worker
    # has just taken): they must end in an HTTP error or a timeout, and nothing fails afterwards.
    down = row(rows, "plain clients")
    assert all(status == 0 or status >= 500 for status in down["failure_statuses"]), down["failures"]
    assert "later: 0 of" in down["measured"], down["measured"]
    assert down["workers"] == 1 and down["failed_later"] == 0


def test_scale_down_under_load_loses_no_answer_through_the_client(own_server, payload):
    """A short run of the repeated scaling check: the project's client (RetryPolicy) loses no answer and none
    takes 5 s; the raw clients' failures, if the race hit, are only TorchServe's worker-gone answers and lost
    jobs. ``python -m bench.reliability --only scaling`` runs 10 of each pattern."""
    before = len(common.workers(own_server))
    try:
        rows = scaling.check_scaling(own_server, payload, 1, 2, runs=1, seconds=6.0, clients=2)
    finally:
        scaling.scale_to(own_server, before, synchronous=True)  # min_worker back to the model's own
    assert_passed(rows)
    retrying = row(rows, "the project's client")["summary"]
    assert retrying["requests"] > 50 and row(rows, "raw HTTP")["scale_downs"] >= 1


@full_only
def test_scaling_asynchronously_does_not_stall_clients(own_server, payload):
    rows = faults.check_scale(own_server, payload, up=4, synchronous=False, settle=2.0)
    assert_passed(rows, "longest client wait")
    assert_passed(rows, "clients retrying")


def test_stop_start_cycles_restore_no_state_and_leave_no_process(own_server, payload):
    cycles = 3 if FULL else 1
    rows = faults.check_stop_start(own_server, payload, cycles=cycles)
    assert_passed(rows)
    state = row(rows, ": state")
    assert state["worker_counts"] == [state["configured"]] * cycles and state["snapshot_dirs"] == []
    assert row(rows, ": processes")["left"] == []


def test_stop_kills_a_worker_java_started_but_never_connected_to(own_server):
    """Java restarts a worker that failed to load; one started as Java stops is no longer below Java and
    would wait on its socket for ever. serve.py's stop finds it by its socket path and kills it."""
    java = own_server.pid()
    workers = {p.pid for p in psutil.Process(java).children(recursive=True)}
    assert workers and {p.pid for p in own_server.processes()} == {java} | workers

    # Such a worker, as Java would have started it: the worker script and a socket in the server's folder;
    # and one of another server (its socket in another folder), which must be left alone.
    def worker(sock):
        command = [sys.executable, "-c", "import time; time.sleep(300)", "ts/model_service_worker.py"]
        return subprocess.Popen([*command, "--sock-type", "unix", "--sock-name", str(sock)])

    stray = worker(own_server.tmp_dir / ".ts.sock.9999")
    other = worker(own_server.tmp_dir.parent.parent / "other-run" / "tmp" / ".ts.sock.9000")
    try:
        assert own_server.stop()
        assert stray.wait(timeout=10) == -signal.SIGKILL
        assert own_server.orphaned_on_stop == [stray.pid] and own_server.killed_on_stop == []
        assert own_server.processes() == [] and other.poll() is None
    finally:
        stray.kill()
        other.kill()
        own_server.start()  # for the tests after this one


def test_request_slower_than_the_response_timeout(tmp_path, model_store, payload):
    store = faults.build_slow_mar(model_store / "cifar3.mar", tmp_path / "store").parent
    srv = start_server(tmp_path / "server", store)
    try:
        (checked,) = faults.check_slow_request(srv, payload)
    finally:
        srv.stop()
    assert_passed([checked])
    # Answered with an error once responseTimeout (2 s) passed, not after the handler's 6-s sleep.
    assert checked["response_timeout"] == 2 and checked["slow_status"] >= 500
    assert 2.0 <= checked["slow_seconds"] < 6.0, checked["measured"]
    assert checked["recovery_s"] is not None and checked["after_statuses"] == [200] * 3


@pytest.mark.parametrize("kind", ["truncated", "bad-checkpoint", pytest.param("garbage", marks=full_only)])
def test_corrupt_mar_fails_start_quickly_and_status_says_why(tmp_path, model_store, kind):
    rows = faults.check_corrupt_mar(tmp_path, model_store / "cifar3.mar", kind)
    assert_passed(rows)
    start, status = row(rows, ": start"), row(rows, "serve.py status")
    assert start["error"] and start["seconds"] <= 60
    assert status["exit_code"] != 0 and status["output"]


def test_start_failure_names_the_port_in_use(tmp_path, model_store, server):
    """A second server given the session server's gRPC ports exits at once; start() says why."""
    taken = {k: v for k, v in read_properties(server.config).items() if k.startswith("grpc_") and k.endswith("_port")}
    assert taken, "the session server's config names its gRPC ports"
    srv = Server(write_server_config(tmp_path, model_store, **taken), tmp_path / "run")
    try:
        with pytest.raises(ServerError, match="(?i)bind|address already in use"):
            srv.start(timeout=120)
    finally:
        srv.stop()


def test_a_stale_pid_file_never_stops_another_process(tmp_path, model_store):
    """Java killed without cleaning up leaves its pid file; the pid may since belong to anything else."""
    srv = Server(write_server_config(tmp_path, model_store), tmp_path / "run")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        srv.pid_file.parent.mkdir(parents=True, exist_ok=True)
        srv.pid_file.write_text(str(other.pid))
        assert srv.pid() is None and not srv.pid_file.exists()  # not TorchServe: the file is removed
        srv.pid_file.write_text(str(other.pid))
        assert srv.stop(timeout=1) is False and other.poll() is None  # nothing was running; nothing signalled
    finally:
        other.kill()
        other.wait()
