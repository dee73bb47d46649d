"""HA_BACKEND=swarm for real: a single-node Docker Swarm on the local engine.

If the engine is not in a swarm, this module makes one: ``docker swarm init`` advertising
an address (198.18.211.x, a benchmarking range) on a veth pair it creates (the engine
refuses loopback), with its overlay address pool in 198.18.212.0/24, and marks the node
with labels: the run that made it, its veth pair, whether the init made
``docker_gwbridge``. Every run of this module names its objects with its own id
(``RUN_ID``) and registers itself on the node (a label of its own) while it uses the
swarm; init, registration and leave are serialised between runs by a lock file
(``SWARM_LOCK``, fcntl). At the end the last run out of a swarm made by this module (no
other run registered, nothing in it but this run's objects) runs ``docker swarm leave
--force``, removes ``docker_gwbridge`` if the init made it, and only after a successful
leave deletes the veth pair (a swarm left running keeps its advertise address). A swarm
this module did not make is never left. Each test's lock is a Swarm config of its own,
removed at the end.

Replicas are real processes (``CHILD``) built by ``SwarmLeadership.from_config`` from the
environment, each talking to the engine through its own unix-socket proxy (``PROXY``)
that the test can freeze with SIGSTOP (requests then hang unanswered, the worst case for
a leader that must step down in time) or slow down with SIGUSR1 (requests reach the
engine at once, so writes commit, but the answers to POSTs come ``SLOW`` s late). Each
replica appends to its own file: ``LEAD <wall time>`` when ``acquire`` returns and ``END
<start> <end> <why>`` when ``lost()`` returns or it is stopped (before it releases). One
host, one wall clock: the test checks that these intervals never overlap. The replicas
are host processes, not tasks of a service; to the election that is the same (the same
engine API). Not tested here: a multi-node swarm, replicas on worker nodes, a manager
quorum loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import docker
import docker.errors
import pytest

from agent_clients.leadership.swarm import HOLDER, RENEWALS, SwarmLeadership

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
LEASE, DEADLINE, RETRY = 3.0, 2.0, 0.5
SLOW = DEADLINE + 0.5  # how late a slowed proxy answers a POST: past the per-call timeout and the deadline
RUN_ID = f"sswarm{uuid.uuid4().hex[:8]}"  # every object of this run is named with it
IMAGE = os.environ.get("DESKTOP_IMAGE", "streamspace/desktop:bookworm-3")
SWARM_LOCK = "/tmp/streamspace-swarm-test.lock"  # serialises init, registration and leave across runs
MADE_BY = "streamspace.test.swarm.made-by"  # node labels: the run that made the swarm,
VETH = "streamspace.test.swarm.veth"  # the veth pair it advertises on,
GWBRIDGE = "streamspace.test.swarm.gwbridge-made"  # whether the init made docker_gwbridge,
USER = "streamspace.test.swarm.user."  # and one per run using it now (+ the run id)


# --- the swarm -----------------------------------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


def _engine_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    assert host.startswith("unix://"), f"these tests proxy the engine's unix socket, DOCKER_HOST is {host}"
    return host[len("unix://") :]


def _ours(name: str) -> bool:
    return name.startswith(RUN_ID)


@contextlib.contextmanager
def _swarm_lock():
    with open(SWARM_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _node_labels(client: docker.DockerClient, change=None) -> dict[str, str]:
    """The node's labels, after ``change(labels)`` was written (a CAS: retried if it moved)."""
    for _ in range(10):
        node = client.nodes.get(client.info()["Swarm"]["NodeID"])
        spec = node.attrs["Spec"]
        labels = dict(spec.get("Labels") or {})
        if change is None:
            return labels
        change(labels)
        try:
            node.update({**spec, "Labels": labels})
            return labels
        except docker.errors.APIError as exc:
            if "out of sequence" not in str(exc):
                raise
    raise AssertionError("could not update the node's labels")


@pytest.fixture(scope="module")
def engine():
    client = docker.from_env(timeout=30)
    with _swarm_lock():
        state = client.info()["Swarm"]
        if state["LocalNodeState"] == "inactive":
            _init_swarm(client)
        else:
            assert state["LocalNodeState"] == "active" and state["ControlAvailable"], (
                f"the engine is in a swarm but not a manager: {state}"
            )
        _node_labels(client, lambda labels: labels.update({USER + RUN_ID: "1"}))
    try:
        yield client
    finally:
        with _swarm_lock():
            _leave_if_last(client)
        client.close()


def _init_swarm(client: docker.DockerClient) -> None:
    tag = uuid.uuid4().hex[:6]
    host_if, peer_if = f"ssw{tag}a", f"ssw{tag}b"
    addr = f"198.18.211.{2 + int(tag, 16) % 250}"
    gwbridge_existed = bool(client.networks.list(names=["docker_gwbridge"]))
    _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
    try:
        _run("ip", "addr", "add", f"{addr}/32", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "link", "set", peer_if, "up")
        print(f"swarm: init advertising {addr} on {host_if} (run {RUN_ID})", flush=True)
        _run(
            "docker", "swarm", "init", "--advertise-addr", addr, "--listen-addr", f"{addr}:2377",
            "--default-addr-pool", "198.18.212.0/24", "--default-addr-pool-mask-length", "26",
        )  # fmt: skip
    except BaseException:
        _run("ip", "link", "del", host_if, check=False)
        raise
    made = {MADE_BY: RUN_ID, VETH: host_if, GWBRIDGE: "no" if gwbridge_existed else "yes"}
    _node_labels(client, lambda labels: labels.update(made))


def _leave_if_last(client: docker.DockerClient) -> None:
    labels = _node_labels(client, lambda labels: labels.pop(USER + RUN_ID, None))
    if MADE_BY not in labels:
        print("swarm: not made by this module: staying in it", flush=True)
        return
    users = sorted(k[len(USER) :] for k in labels if k.startswith(USER))
    others = [s.name for s in client.services.list() if not _ours(s.name)]
    others += [c.name for c in client.configs.list() if not _ours(c.name)]
    others += [s.name for s in client.secrets.list() if not _ours(s.name)]
    others += [n.name for n in client.networks.list(filters={"scope": "swarm"}) if n.name != "ingress"]
    if users or others:  # another run, or someone else, uses the swarm: leave it to them
        print(f"swarm: NOT leaving, in use by runs {users} and objects {others}", flush=True)
        return
    started = time.monotonic()
    left = _run("docker", "swarm", "leave", "--force", check=False)
    if left.returncode != 0:  # still in the swarm: it keeps its advertise address, so the veth stays
        warnings.warn(f"docker swarm leave failed, veth {labels[VETH]} kept: {left.stderr.strip()}", stacklevel=1)
        return
    print(f"swarm: left ({time.monotonic() - started:.1f} s), made by run {labels[MADE_BY]}", flush=True)
    if labels.get(GWBRIDGE) == "yes":
        deadline = time.monotonic() + 15
        while _run("docker", "network", "rm", "docker_gwbridge", check=False).returncode != 0:
            if not client.networks.list(names=["docker_gwbridge"]) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    _run("ip", "link", "del", labels[VETH], check=False)


@pytest.fixture(scope="module")
def image_id(engine):
    """By ID, so that a task never tries to pull it (the engine skips the pull for an ID)."""
    return engine.images.get(IMAGE).id


def lock_name() -> str:
    return f"{RUN_ID}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def lock(engine):
    """A fresh lock name; its config (made by the replicas or the test) is removed at the end."""
    name = lock_name()
    yield name
    with contextlib.suppress(docker.errors.NotFound):
        engine.api.remove_config(name)


def released(engine, name: str) -> None:
    """The state a graceful release leaves: the config exists with holder ""."""
    engine.api.create_config(name, b"test lock\n", labels={HOLDER: "", RENEWALS: "0"})


def labels(engine, name: str) -> dict[str, str]:
    return engine.api.inspect_config(name)["Spec"].get("Labels") or {}


def created_at(engine, name: str) -> float:
    """The config's creation time (the engine's clock: this host's), as a Unix time."""
    raw = engine.api.inspect_config(name)["CreatedAt"]  # e.g. 2026-12-01T23:30:33.123456789Z
    whole, _, frac = raw.rstrip("Z").partition(".")
    stamp = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC).timestamp()
    return stamp + float(f"0.{frac or 0}")


def wait_until(what: str, predicate, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(step)


# --- replicas, each behind its own proxy ---------------------------------------------

PROXY = """
import asyncio, re, signal, sys
listen, target, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
state = {"slow": False}
REQUEST = re.compile(rb"^[A-Z]+ /")
async def pipe(reader, writer, conn, upstream):
    try:
        while data := await reader.read(65536):
            if upstream and REQUEST.match(data):  # a request's first bytes (no pipelining here)
                conn["post"] = data.startswith(b"POST ")
            if not upstream and state["slow"] and conn["post"]:
                await asyncio.sleep(slow)  # the engine has acted already: only the answer is late
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
async def handle(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(target)
    except OSError:
        writer.close()
        return
    conn = {"post": False}
    await asyncio.gather(pipe(reader, up_writer, conn, True), pipe(up_reader, writer, conn, False))
async def main():
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, state.update, {"slow": True})
    loop.add_signal_handler(signal.SIGUSR2, state.update, {"slow": False})
    server = await asyncio.start_unix_server(handle, listen)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


class Proxy:
    """A unix-socket proxy to the engine that the test can freeze or slow down."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.host = f"unix://{sock}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROXY, str(sock), _engine_socket(), str(SLOW)], stdout=subprocess.PIPE, text=True
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        assert ready and self.proc.stdout.readline().strip() == "READY", "proxy did not start"

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def slow_down(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def speed_up(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def short_dir():
    """A directory with a short path (unix socket paths are limited to about 100 bytes)."""
    workdir = Path(tempfile.mkdtemp(prefix="ssw", dir="/tmp"))
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


CHILD = """
import asyncio, logging, signal, sys, time
from agent_clients.config import parse_config
from agent_clients.leadership.swarm import SwarmLeadership
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
out = open(sys.argv[1], "a", buffering=1)
async def main():
    lead = SwarmLeadership.from_config(parse_config([]))
    out.write(f"ID {lead.identity}\\n")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    stopping = asyncio.create_task(stop.wait())
    while True:
        acquiring = asyncio.create_task(lead.acquire())
        await asyncio.wait([acquiring, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            acquiring.cancel()
            break
        start = time.time()
        out.write(f"LEAD {start:.6f}\\n")
        losing = asyncio.create_task(lead.lost())
        await asyncio.wait([losing, stopping], return_when=asyncio.FIRST_COMPLETED)
        end = time.time()
        if stop.is_set():
            out.write(f"END {start:.6f} {end:.6f} released\\n")
            await lead.release()
            break
        out.write(f"END {start:.6f} {end:.6f} lost\\n")
    lead.close()
    out.write("EXIT\\n")
asyncio.run(main())
"""


class Replica:
    def __init__(self, workdir: Path, n: int, lock: str) -> None:
        self.n = n
        self.sock = workdir / f"p{n}.sock"
        self.events = workdir / f"replica-{n}.events"
        self.stderr = workdir / f"replica-{n}.log"
        self.killed_at: float | None = None
        self.proxy = Proxy(self.sock)
        env = {
            **os.environ,
            "AGENT_ID": "swarm-test",
            "CONTROL_PLANE_URL": "ws://127.0.0.1:1",
            "AGENT_TOKEN": "ssa_test",
            "HA_BACKEND": "swarm",
            "HA_LOCK_NAME": lock,
            "HA_SWARM_DOCKER_HOST": self.proxy.host,
            "HA_LEASE_DURATION": str(LEASE),
            "HA_RENEW_DEADLINE": str(DEADLINE),
            "HA_RETRY_PERIOD": str(RETRY),
        }
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(self.events)], cwd=ROOT, env=env, stderr=err)

    def _lines(self) -> list[list[str]]:
        try:
            return [line.split() for line in self.events.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    @property
    def identity(self) -> str | None:
        return next((line[1] for line in self._lines() if line[0] == "ID"), None)

    def leads(self) -> list[float]:
        return [float(line[1]) for line in self._lines() if line[0] == "LEAD"]

    def ends(self) -> list[tuple[float, str]]:
        return [(float(line[2]), line[3]) for line in self._lines() if line[0] == "END"]

    @property
    def leading(self) -> bool:
        """It believes it leads: a LEAD without its END, and it is alive."""
        return self.killed_at is None and len(self.leads()) > len(self.ends())

    def spans(self, now: float) -> list[tuple[float, float, str]]:
        """(start, end, why) of every term; a killed replica's last term ends at the kill."""
        result = []
        ends = {float(line[1]): (float(line[2]), line[3]) for line in self._lines() if line[0] == "END"}
        for start in self.leads():
            end, why = ends.get(start, (self.killed_at or now, "killed" if self.killed_at else "running"))
            result.append((start, end, why))
        return result

    def kill(self) -> float:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed_at = time.time()  # after it died: it may have acted until then
        return self.killed_at

    def terminate(self) -> float:
        """Graceful stop; the wall time it stopped acting (its END line)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        released_ = [end for end, why in self.ends() if why == "released"]
        assert released_, f"replica {self.n} did not log its release"
        return released_[-1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proxy.close()


@pytest.fixture
def replicas(lock, short_dir):
    workdir = short_dir
    started: list[Replica] = []

    def start(count: int) -> list[Replica]:
        started.extend(Replica(workdir, len(started) + n, lock) for n in range(count))
        return started

    yield start
    for replica in started:
        replica.close()
    for replica in started:
        print(f"--- replica {replica.n} ({replica.identity}) ---\n{replica.stderr.read_text()[-3000:]}")


def leaders(replicas: list[Replica]) -> list[Replica]:
    return [r for r in replicas if r.leading]


def assert_terms_never_overlap(replicas: list[Replica]) -> None:
    """Sorted by start, each term begins after the one before ended: right after a
    graceful release, and at least lease - deadline (less a margin for scheduling) after
    a leader that died or was cut off."""
    now = time.time()
    spans = sorted((start, end, why, r.n) for r in replicas for start, end, why in r.spans(now))
    for (_, end, why, n), (start, _, _, m) in itertools.pairwise(spans):
        need = 0.0 if why == "released" else LEASE - DEADLINE - 0.4
        assert start - end > need, f"replica {m} began {start - end:+.3f} s after replica {n} ended ({why})"


# --- the engine's compare-and-swap, which everything rests on ------------------------


def test_the_engine_refuses_a_stale_version_and_one_racing_candidate_wins(engine, lock):
    released(engine, lock)
    first = engine.api.inspect_config(lock)
    api, version = engine.api, first["Version"]["Index"]
    url = api._url("/configs/{0}/update", first["ID"])
    spec = {**first["Spec"], "Labels": {HOLDER: "x"}}
    api._raise_for_status(api._post_json(url, data=spec, params={"version": version}))
    with pytest.raises(docker.errors.APIError, match="update out of sequence"):
        api._raise_for_status(api._post_json(url, data={**spec, "Labels": {HOLDER: "y"}}, params={"version": version}))
    assert labels(engine, lock)[HOLDER] == "x"
    engine.api.remove_config(lock)

    # Two candidates read the same released record, then both write: exactly one wins.
    released(engine, lock)
    a, b = candidate(lock, "cand-a"), candidate(lock, "cand-b")
    try:
        barrier = threading.Barrier(2, timeout=10)
        for cand in (a, b):
            real_read = cand._read

            def read_then_wait(_real=real_read):
                record = _real()
                barrier.wait()  # both hold the same version before either writes
                return record

            cand._read = read_then_wait
        results: dict[str, float | None] = {}
        threads = [threading.Thread(target=lambda c=c: results.update({c.identity: c._try_acquire()})) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        winners = [who for who, sent in results.items() if sent is not None]
        assert len(results) == 2 and len(winners) == 1, results
        assert labels(engine, lock)[HOLDER] == winners[0]
    finally:
        a.close()
        b.close()


# --- replicas ------------------------------------------------------------------------


def test_one_of_three_leads_and_a_killed_leader_is_replaced_within_the_lease(engine, lock, replicas):
    """After kill -9 of the leader (no release: the record keeps its holder) a standby
    takes over within lease + retry period of the kill: the leader's last renewal was
    written before the kill, a standby read that version at most a retry period later
    and swaps its own identity in once it has stayed unchanged for the lease. The bound
    asserted is LEASE + RETRY + 1.5 s (scheduling on a loaded 2-core machine). That no
    term overlaps another is asserted at the end (the safety property)."""
    group = replicas(3)  # no config yet: they create it, then wait out its silence like any holder's
    (leader,) = wait_until("a first leader", lambda: leaders(group), LEASE + 15)
    created = created_at(engine, lock)
    print(f"first leader {leader.leads()[0] - created:.2f} s after the config was created")
    assert leader.leads()[0] - created >= LEASE - 0.05  # nobody took the fresh, holder-less config at once
    renewals = int(labels(engine, lock)[RENEWALS])

    time.sleep(LEASE + RETRY)  # over a lease: only its renewals keep the standbys waiting
    assert leaders(group) == [leader]
    assert [len(r.leads()) for r in group].count(0) == 2
    record = labels(engine, lock)
    assert record[HOLDER] == leader.identity
    assert int(record[RENEWALS]) >= renewals + 3  # renewed about every retry period

    killed = leader.kill()  # no release: the record keeps its holder
    standbys = [r for r in group if r is not leader]
    (successor,) = wait_until("a successor", lambda: leaders(standbys), LEASE + RETRY + 8)
    took = successor.leads()[0] - killed
    print(f"takeover after kill -9 of the leader: {took:.2f} s")
    assert took <= LEASE + RETRY + 1.5, took
    assert labels(engine, lock)[HOLDER] == successor.identity
    time.sleep(RETRY * 2)
    assert leaders(group) == [successor]
    assert_terms_never_overlap(group)


def test_a_cut_off_leader_steps_down_before_another_takes_over_and_leads_again_later(engine, lock, replicas):
    released(engine, lock)
    group = replicas(3)
    (leader,) = wait_until("a first leader", lambda: leaders(group), 15)
    time.sleep(1.0)  # a couple of renewals go through

    cut = time.time()
    leader.proxy.freeze()  # its engine calls now hang unanswered
    end, why = wait_until("the cut-off leader steps down", lambda: leader.ends(), DEADLINE + 4)[0]
    standbys = [r for r in group if r is not leader]
    (successor,) = wait_until("a successor", lambda: leaders(standbys), LEASE + RETRY + 8)
    start = successor.leads()[0]
    print(
        f"cut off: stepped down after {end - cut:.2f} s, successor after {start - cut:.2f} s, gap {start - end:.2f} s"
    )
    assert why == "lost"
    assert end - cut <= DEADLINE + 1.0  # its renew deadline ran from its last renewal, sent before the cut
    assert start - end >= LEASE - DEADLINE - 0.4  # fenced: nobody else acts until well after it stopped
    assert start - cut <= LEASE + RETRY + 1.5

    leader.proxy.thaw()  # healed: it does not grab the lock back while the successor renews
    time.sleep(LEASE + RETRY)
    assert leaders(group) == [successor] and len(leader.leads()) == 1

    # Graceful stops hand over within about a retry period, until the once cut-off
    # replica leads again: the same process, never restarted.
    alive = list(group)
    for _ in range(2):
        (current,) = leaders(alive)
        alive.remove(current)
        stopped = current.terminate()
        (nxt,) = wait_until("a handover after a release", lambda: leaders(alive), RETRY + 5)
        handover = nxt.leads()[-1] - stopped
        print(f"graceful handover: {handover:.2f} s")
        assert handover <= RETRY + 1.0, handover  # its next poll, plus scheduling on a loaded machine
        if nxt is leader:
            break
    assert leaders(group) == [leader] and len(leader.leads()) == 2
    assert labels(engine, lock)[HOLDER] == leader.identity
    assert_terms_never_overlap(group)


def test_a_leader_whose_answers_come_late_steps_down_on_time_and_wins_back_later(engine, lock, replicas):
    """Not frozen but slow: the leader's renewals reach the engine and are committed, but
    every answer to a POST comes SLOW s late (past the per-call timeout and the renew
    deadline). A renewal whose answer is late does not count, so the leader steps down
    at its renew deadline; its late writes keep the record moving under its own name, so
    no standby takes over meanwhile (safe, not live). Once the answers are on time again
    the same process leads again (the record still names it: no lease to wait)."""
    released(engine, lock)
    group = replicas(2)
    (leader,) = wait_until("a first leader", lambda: leaders(group), 15)
    (standby,) = [r for r in group if r is not leader]
    time.sleep(1.0)
    renewals = int(labels(engine, lock)[RENEWALS])

    slowed = time.time()
    leader.proxy.slow_down()
    end, why = wait_until("the slowed leader steps down", lambda: leader.ends(), DEADLINE + 4)[0]
    print(f"slow answers: stepped down after {end - slowed:.2f} s")
    assert why == "lost"
    assert end - slowed <= DEADLINE + 1.0
    time.sleep(LEASE)
    record = labels(engine, lock)
    assert int(record[RENEWALS]) > renewals + 2  # its writes were committed all along ...
    assert record[HOLDER] == leader.identity  # ... under its name
    assert leaders(group) == [] and standby.leads() == []

    leader.proxy.speed_up()
    wait_until("the same process leads again", lambda: len(leader.leads()) == 2 and leader.leading, RETRY + 5)
    time.sleep(2 * RETRY)
    assert leaders(group) == [leader] and standby.leads() == []
    assert_terms_never_overlap(group)


# --- in-process --------------------------------------------------------------------


def candidate(lock: str, identity: str, docker_host: str = "") -> SwarmLeadership:
    return SwarmLeadership(
        name=lock,
        identity=identity,
        docker_host=docker_host,
        lease_duration=LEASE,
        renew_deadline=DEADLINE,
        retry_period=RETRY,
    )


@pytest.fixture
def agent_service(engine, image_id):
    """The agent's own service stand-in: one running task (``sleep``, not the desktop)."""
    service = engine.services.create(
        image_id,
        command=["sleep", "infinity"],
        name=f"{RUN_ID}-svc-{uuid.uuid4().hex[:8]}",
        mode=docker.types.ServiceMode("replicated", 1),
        labels={"streamspace.test": "swarm-leadership"},
        stop_signal="SIGKILL",  # sleep as PID 1 ignores SIGTERM: no 10 s grace period at removal
    )
    try:
        yield service
    finally:
        service.remove()


def _tasks(service) -> list[tuple[str, str, str]]:
    return sorted(
        (t["ID"], t["Status"]["State"], (t["Status"].get("ContainerStatus") or {}).get("ContainerID", ""))
        for t in service.tasks()
    )


def test_the_election_leaves_the_agents_service_and_its_tasks_alone(engine, lock, agent_service):
    running = wait_until(
        "the service's task runs",
        lambda: [t for t in _tasks(agent_service) if t[1] == "running" and t[2]],
        30,
        0.1,
    )
    version = engine.api.inspect_service(agent_service.id)["Version"]["Index"]
    started_at = engine.api.inspect_container(running[0][2])["State"]["StartedAt"]

    async def election():
        a, b = candidate(lock, "svc-a"), candidate(lock, "svc-b")
        try:
            await within_test(a.acquire(), LEASE + 5)  # a fresh config: created, then a lease of silence
            standby = asyncio.create_task(b.acquire())
            await asyncio.sleep(4 * RETRY)  # renewals
            assert not standby.done()
            await a.release()
            assert not a.is_leader
            await within_test(standby, RETRY + 3)
            assert b.is_leader
            await b.release()
            assert not b.is_leader
        finally:
            a.close()
            b.close()

    asyncio.run(election())
    assert int(labels(engine, lock)[RENEWALS]) >= 5  # the lock itself was written again and again
    assert engine.api.inspect_service(agent_service.id)["Version"]["Index"] == version  # never written
    assert _tasks(agent_service) == running  # the same one task, still running: nothing restarted
    assert engine.api.inspect_container(running[0][2])["State"]["StartedAt"] == started_at


async def within_test(awaitable, seconds: float):
    async with asyncio.timeout(seconds):
        return await awaitable


def test_a_leader_that_stepped_down_still_clears_its_record_and_a_deleted_config_is_named(
    engine, lock, short_dir, caplog
):
    """A replica cut off from the engine steps down (``lost()``, ``is_leader`` false); its
    record still names it. SIGTERM comes next: ``release()`` must still clear the record,
    or the standbys wait out a whole lease. Then: a config deleted under a leader ends its
    term with a reason that says so."""
    released(engine, lock)
    proxy = Proxy(short_dir / "p.sock")

    async def scenario():
        a = candidate(lock, "cut-a", docker_host=proxy.host)
        try:
            await within_test(a.acquire(), RETRY + 3)  # released: taken at once
            assert a.is_leader
            proxy.freeze()
            await within_test(a.lost(), DEADLINE + 3)
            assert not a.is_leader
            proxy.thaw()
            assert labels(engine, lock)[HOLDER] == "cut-a"
            await within_test(a.release(), 6)
            assert not a.is_leader
            assert labels(engine, lock)[HOLDER] == ""  # cleared: a standby takes it on its next poll

            await within_test(a.acquire(), RETRY + 3)
            assert a.is_leader
            engine.api.remove_config(lock)
            await within_test(a.lost(), RETRY + 3)
            assert not a.is_leader
        finally:
            a.close()

    try:
        with caplog.at_level("INFO", logger="agent_clients.leadership.swarm"):
            asyncio.run(scenario())
    finally:
        proxy.close()
    downs = [r.getMessage() for r in caplog.records if "steps down" in r.getMessage()]
    assert len(downs) == 2 and "no successful renewal" in downs[0], downs  # cut off; then deleted
    assert f"the lock's config {lock} was deleted" in downs[-1], downs


def test_each_engine_outage_is_warned_once(engine, lock, short_dir, caplog):
    """A standby whose engine stops answering twice: one warning per outage (not one per
    retry period, and not only for the first outage), debug lines for the retries."""
    released(engine, lock)
    proxy = Proxy(short_dir / "p.sock")
    outages: list[tuple[float, float]] = []

    async def scenario():
        holder, standby = candidate(lock, "o-holder"), candidate(lock, "o-standby", docker_host=proxy.host)
        try:
            await within_test(holder.acquire(), RETRY + 3)
            waiting = asyncio.create_task(standby.acquire())
            for _ in range(2):
                await asyncio.sleep(3 * RETRY)  # polls answered
                began = time.time()
                proxy.freeze()
                await asyncio.sleep(5 * RETRY)  # polls time out
                proxy.thaw()
                outages.append((began, time.time()))
            await asyncio.sleep(3 * RETRY)
            assert not waiting.done()
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        finally:
            holder.close()
            standby.close()

    try:
        with caplog.at_level("DEBUG", logger="agent_clients.leadership.swarm"):
            asyncio.run(scenario())
    finally:
        proxy.close()
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "acquire attempt failed" in r.getMessage()]
    for began, ended in outages:
        during = [r.getMessage() for r in warned if began <= r.created <= ended + RETRY + 1]
        assert during, f"no warning for the outage {began:.2f}-{ended:.2f}: {[r.getMessage() for r in warned]}"
        assert len(during) == len(set(during)), during  # each distinct error once per outage
    assert len([r for r in caplog.records if "failed again" in r.getMessage()]) >= 2


def test_a_standby_without_an_engine_keeps_retrying_and_warns_once(caplog, tmp_path):
    async def scenario():
        lone = candidate(lock_name(), "lone", docker_host=f"unix://{tmp_path}/no-engine.sock")
        try:
            with pytest.raises(TimeoutError):
                await within_test(lone.acquire(), 6 * RETRY)
        finally:
            lone.close()

    with caplog.at_level("DEBUG", logger="agent_clients.leadership.swarm"):
        asyncio.run(scenario())
    warnings_ = [r for r in caplog.records if r.levelname == "WARNING"]
    retries = [r for r in caplog.records if "failed again" in r.getMessage()]
    assert len(warnings_) == 1 and "acquire attempt failed" in warnings_[0].getMessage()
    assert len(retries) >= 4  # it kept trying every retry period
