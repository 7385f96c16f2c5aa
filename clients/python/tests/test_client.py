"""Tests of trail_client against the real daemon.

`$TRAILD` names the daemon binary (the Rust test suite sets it); `$TRAIL_EVENT_TYPES` the repository's starter
event types. Each test class starts its own daemon in a temporary directory and stops it with SIGTERM.
"""

import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trail_client  # noqa: E402

TRAILD = os.environ.get("TRAILD", "traild")
EVENT_TYPES = os.environ.get(
    "TRAIL_EVENT_TYPES", os.path.join(os.path.dirname(__file__), "..", "..", "..", "event-types"))

# A stream-only type that no sink selects: the daemon answers `unavailable` for it.
STREAM_ONLY = """name: py_stream_only
description: Streamed only, and no sink selects it.
feature_category: testing
saved_to_database: false
streamed: true
scope: [Instance]
"""

LOG_LINE = """name: py_log_line
description: A line of a Python program's log.
feature_category: testing
saved_to_database: true
streamed: false
scope: [Instance]
payload:
  type: object
  required: [logger, level]
  additionalProperties: false
  properties:
    logger: {type: string}
    level: {type: string, enum: [DEBUG, INFO, WARNING, ERROR, CRITICAL]}
"""


def wait_for(predicate, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Daemon:
    """The real daemon in a temporary directory (private, so the client's socket checks pass)."""

    def __init__(self, extra_config=""):
        self.dir = tempfile.mkdtemp(prefix="trail-py-")
        os.chmod(self.dir, 0o700)
        types = os.path.join(self.dir, "event-types")
        os.mkdir(types)
        for name in os.listdir(EVENT_TYPES):
            if name.endswith((".yml", ".yaml")):
                shutil.copy(os.path.join(EVENT_TYPES, name), types)
        with open(os.path.join(types, "py_stream_only.yml"), "w") as f:
            f.write(STREAM_ONLY)
        with open(os.path.join(types, "py_log_line.yml"), "w") as f:
            f.write(LOG_LINE)
        self.socket = os.path.join(self.dir, "trail.sock")
        self.log_dir = os.path.join(self.dir, "log")
        self.config = os.path.join(self.dir, "trail.yaml")
        with open(self.config, "w") as f:
            f.write("socket: {path: trail.sock}\nevent_types: event-types\nlog: {dir: log}\n" + extra_config)
        self.stderr = open(os.path.join(self.dir, "stderr"), "w+")
        self.process = subprocess.Popen([TRAILD, "--config", self.config], stderr=self.stderr)
        wait_for(self.accepting, "the daemon's socket")

    def accepting(self):
        if self.process.poll() is not None:
            self.stderr.seek(0)
            raise AssertionError(f"traild exited with {self.process.returncode}: {self.stderr.read()}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def records(self):
        """Every record in the log, in order."""
        out = []
        for name in sorted(os.listdir(self.log_dir)):
            if name.endswith(".jsonl"):
                with open(os.path.join(self.log_dir, name), "rb") as f:
                    out.extend(json.loads(line) for line in f if line.endswith(b"\n"))
        return [r for r in out if not r["type"].startswith("trail_")]

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(timeout=60)
            if code != 0:
                self.stderr.seek(0)
                raise AssertionError(f"traild exited with {code}: {self.stderr.read()}")
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class AgainstTheDaemon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon("limits: {max_line_bytes: 4096}\n")

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()

    def client(self, **kwargs):
        return trail_client.Client(self.daemon.socket, **kwargs)

    def test_submit_returns_the_stored_records_id_and_seq(self):
        with self.client() as client:
            ack = client.submit(trail_client.event(
                "user_login", actor={"id": "u-42", "ip": "10.0.0.7"}, outcome="success",
                message="signed in from python", payload={"method": "sso"}))
        self.assertIsInstance(ack, trail_client.Ack)
        self.assertFalse(ack.duplicate)
        stored = [r for r in self.daemon.records() if r["id"] == ack.id]
        self.assertEqual(len(stored), 1, "the acknowledged event is in the log once")
        self.assertEqual(stored[0]["seq"], ack.seq)
        self.assertEqual(stored[0]["message"], "signed in from python")
        self.assertEqual(stored[0]["source"]["uid"], os.geteuid())

    def test_each_error_code_is_its_own_exception(self):
        cases = [
            (trail_client.InvalidEvent, {"type": "user_login", "colour": "red"}),
            (trail_client.UnknownType, {"type": "no_such_type_here"}),
            (trail_client.InvalidPayload, {"type": "py_log_line", "payload": {"logger": "x"}}),
            (trail_client.TooLarge, {"type": "user_login", "message": "x" * 5000}),
            (trail_client.Unavailable, {"type": "py_stream_only"}),
            (trail_client.Forbidden, {"type": "trail_log_file_deleted"}),
        ]
        with self.client() as client:
            for cls, request in cases:
                with self.subTest(code=cls.code):
                    with self.assertRaises(cls) as caught:
                        client.submit(request)
                    self.assertEqual(caught.exception.code, cls.code)
                    self.assertTrue(caught.exception.message, "the daemon's message is kept")
                    self.assertEqual(caught.exception.retryable, cls is trail_client.Unavailable)
            # The connection is still usable after every refusal.
            client.submit({"type": "user_logout", "actor": {"id": "u-42"}})

    def test_invalid_json_is_refused_as_invalid_json(self):
        # The client itself always sends valid JSON; a repeated key (a Python dict cannot hold one) is the way
        # to get this code, sent as raw text.
        with self.client() as client:
            client.connect()
            client._sock.sendall(b'{"type":"user_login","type":"user_login"}\n')
            answer = trail_client._answer(client._read_line())
        self.assertIsInstance(answer, trail_client.InvalidJson)

    def test_payload_violations_are_listed_in_details(self):
        with self.client() as client:
            with self.assertRaises(trail_client.InvalidPayload) as caught:
                client.submit({"type": "py_log_line", "payload": {"logger": 1, "level": "LOUD"}})
        paths = sorted(d.path for d in caught.exception.details)
        self.assertEqual(paths, ["/payload/level", "/payload/logger"])

    def test_submit_many_pipelines_and_keeps_order(self):
        events = []
        for i in range(500):
            if i % 50 == 7:
                events.append({"type": "no_such_type_here"})
            else:
                events.append(trail_client.event("user_logout", actor={"id": f"u-{i}"}))
        with self.client() as client:
            results = client.submit_many(events)
        self.assertEqual(len(results), 500)
        acks = [r for r in results if isinstance(r, trail_client.Ack)]
        refused = [i for i, r in enumerate(results) if isinstance(r, trail_client.UnknownType)]
        self.assertEqual(refused, [i for i in range(500) if i % 50 == 7])
        seqs = [a.seq for a in acks]
        self.assertEqual(seqs, sorted(seqs), "answers come in the order the events were sent")
        stored = {r["id"]: r for r in self.daemon.records()}
        for i, r in enumerate(results):
            if isinstance(r, trail_client.Ack):
                self.assertEqual(stored[r.id]["actor"]["id"], f"u-{i}")

    def test_logging_handler_sends_records_as_events(self):
        logger = logging.getLogger("trail-py-test")
        logger.propagate = False
        handler = trail_client.TrailHandler("py_log_line", client=self.client())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            logger.info("deploy %s started", "r-1")
            logger.warning("deploy %s slow", "r-1")
        finally:
            logger.removeHandler(handler)
            handler.close()
        mine = [r for r in self.daemon.records() if r["type"] == "py_log_line"]
        self.assertEqual([r["message"] for r in mine], ["deploy r-1 started", "deploy r-1 slow"])
        self.assertEqual([r["payload"]["level"] for r in mine], ["INFO", "WARNING"])
        self.assertEqual(mine[0]["payload"]["logger"], "trail-py-test")

    def test_a_socket_that_others_could_replace_is_refused(self):
        open_dir = tempfile.mkdtemp(prefix="trail-py-open-")
        try:
            os.chmod(open_dir, 0o777)
            link = os.path.join(open_dir, "trail.sock")
            os.symlink(self.daemon.socket, link)
            with self.assertRaises(trail_client.UntrustedSocket) as caught:
                trail_client.Client(link).submit({"type": "user_logout"})
            self.assertIn(open_dir, str(caught.exception))
        finally:
            shutil.rmtree(open_dir)

    def test_no_daemon_is_unreachable_and_retryable(self):
        missing = os.path.join(self.daemon.dir, "nobody-here.sock")
        with self.assertRaises(trail_client.Unreachable) as caught:
            trail_client.Client(missing).submit({"type": "user_logout"})
        self.assertTrue(caught.exception.retryable)
        self.assertIn("nobody-here.sock", str(caught.exception))


class TooManyConnections(unittest.TestCase):
    def test_a_full_daemon_turns_a_client_away_with_a_retryable_error(self):
        daemon = Daemon("limits: {max_connections: 1}\n")
        try:
            holder = trail_client.Client(daemon.socket)
            # Held once acknowledged: the daemon then counts it (the readiness probe may hold the place a moment).
            deadline = time.monotonic() + 30
            while True:
                try:
                    holder.submit({"type": "user_logout"})
                    break
                except trail_client.TooManyConnections:
                    holder.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            with self.assertRaises(trail_client.TooManyConnections) as caught:
                trail_client.Client(daemon.socket).submit({"type": "user_logout"})
            self.assertTrue(caught.exception.retryable)
            self.assertEqual(caught.exception.code, "too_many_connections")
            holder.close()
        finally:
            daemon.stop()


class Retries(unittest.TestCase):
    """Retries with one idempotency key per event: a retry never stores an event twice."""

    def test_a_retry_after_a_lost_answer_stores_the_event_once(self):
        daemon = Daemon()
        try:
            key = "py-lost-answer-1"
            request = trail_client.event("user_logout", actor={"id": "u-7"}, idempotency_key=key)
            # The first attempt: sent, and the connection closed before the answer was read.
            raw = socket.socket(socket.AF_UNIX)
            raw.connect(daemon.socket)
            raw.sendall(json.dumps(request).encode() + b"\n")
            raw.close()
            wait_for(lambda: any(r.get("idempotency_key") == key for r in daemon.records()), "the first attempt")
            with trail_client.Client(daemon.socket, retry=trail_client.Retry()) as client:
                ack = client.submit(request)
            self.assertTrue(ack.duplicate)
            stored = [r for r in daemon.records() if r.get("idempotency_key") == key]
            self.assertEqual(len(stored), 1)
            self.assertEqual(stored[0]["id"], ack.id)
            with trail_client.Client(daemon.socket) as client:
                with self.assertRaises(trail_client.Conflict):
                    client.submit(trail_client.event("user_logout", actor={"id": "u-8"}, idempotency_key=key))
        finally:
            daemon.stop()

    def test_unavailable_on_a_full_disk_is_retried_and_each_event_stored_once(self):
        daemon = Daemon()
        try:
            with trail_client.Client(daemon.socket) as client:
                client.submit(trail_client.event("user_logout", actor={"id": "before"}))
            # A full disk: every write past the log file's current size fails (EFBIG, as ENOSPC would).
            log_file = max((os.path.join(daemon.log_dir, n) for n in os.listdir(daemon.log_dir)
                            if n.endswith(".jsonl")), key=os.path.getsize)
            full = os.path.getsize(log_file)
            resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, (full, resource.RLIM_INFINITY))
            with trail_client.Client(daemon.socket) as client:
                with self.assertRaises(trail_client.Unavailable):
                    client.submit(trail_client.event("user_logout", actor={"id": "refused"}))
            results = {}
            refusals = []

            class Counting(trail_client.Client):
                def _attempt(self, batch):
                    got = super()._attempt(batch)
                    refusals.extend(r for r in got if isinstance(r, trail_client.Unavailable))
                    return got

            def submit():
                with Counting(daemon.socket, retry=trail_client.Retry(deadline=60)) as client:
                    results["acks"] = client.submit_many(
                        [trail_client.event("user_logout", actor={"id": f"r-{i}"}) for i in range(20)])

            sender = threading.Thread(target=submit)
            sender.start()
            # The disk stays full until the client has had refusals to retry.
            wait_for(lambda: len(refusals) >= 20, "the retrying client's first refusals")
            resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            sender.join(90)
            acks = results["acks"]
            self.assertTrue(all(isinstance(r, trail_client.Ack) for r in acks), acks)
            stored = [r for r in daemon.records() if r["actor"]["id"].startswith("r-")]
            self.assertEqual(sorted(r["actor"]["id"] for r in stored), sorted(f"r-{i}" for i in range(20)),
                             "each event stored exactly once")
            self.assertEqual(sorted(r["id"] for r in stored), sorted(a.id for a in acks))
            self.assertFalse([r for r in daemon.records() if r["actor"]["id"] == "refused"])
        finally:
            daemon.stop()

if __name__ == "__main__":
    unittest.main()
