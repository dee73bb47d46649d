"""HA_BACKEND=swarm for real: a single-node Docker Swarm on the local engine.

If the engine is not in a swarm, this module makes one: ``docker swarm init`` advertising
an address (198.18.211.x, a benchmarking range) on a veth pair it creates (the engine
refuses loopback), with its overlay address pool in 198.18.212.0/24; at the end it runs
``docker swarm leave --force`` (only when nothing but this module's objects is in the
swarm), removes ``docker_gwbridge`` if the init made it, and deletes the veth pair. Each
test's lock is a Swarm config of its own (prefix ``sswarmtest``), removed at the end.

Replicas are real processes (``CHILD``) built by ``SwarmLeadership.from_config`` from the
environment, each talking to the engine through its own unix-socket proxy (``PROXY``)
that the test can freeze with SIGSTOP: requests then hang unanswered, the worst case for
a leader that must step down in time. Each replica appends to its own file: ``LEAD
<wall time>`` when ``acquire`` returns and ``END <start> <end> <why>`` when ``lost()``
returns or it is stopped (before it releases). One host, one wall clock: the test checks
that these intervals never overlap. The replicas are host processes, not tasks of a
service; to the election that is the same (the same engine API). Not tested here: a
multi-node swarm, replicas on worker nodes, a manager quorum loss.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from pathlib import Path

import docker
import docker.errors
import pytest

from agent_clients.leadership.swarm import HOLDER, RENEWALS, SwarmLeadership

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
LEASE, DEADLINE, RETRY = 3.0, 2.0, 0.5
PREFIX = "sswarmtest"
IMAGE = "streamspace/desktop:bookworm-2"


# --- the swarm -----------------------------------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


def _engine_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    assert host.startswith("unix://"), f"these tests proxy the engine's unix socket, DOCKER_HOST is {host}"
    return host[len("unix://") :]


def _ours(name: str) -> bool:
    return name.startswith(PREFIX)


@pytest.fixture(scope="module")
def engine():
    client = docker.from_env(timeout=30)
    state = client.info()["Swarm"]
    made: dict[str, object] | None = None
    if state["LocalNodeState"] == "inactive":
        made = _init_swarm(client)
    else:
        assert state["LocalNodeState"] == "active" and state["ControlAvailable"], (
            f"the engine is in a swarm but not a manager: {state}"
        )
    try:
        yield client
    finally:
        if made is not None:
            _leave_swarm(client, made)
        client.close()


def _init_swarm(client: docker.DockerClient) -> dict[str, object]:
    tag = uuid.uuid4().hex[:6]
    host_if, peer_if = f"ssw{tag}a", f"ssw{tag}b"
    addr = f"198.18.211.{2 + int(tag, 16) % 250}"
    made = {
        "veth": host_if,
        "gwbridge_existed": bool(client.networks.list(names=["docker_gwbridge"])),
    }
    _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
    try:
        _run("ip", "addr", "add", f"{addr}/32", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "link", "set", peer_if, "up")
        print(f"swarm: init advertising {addr} on {host_if}", flush=True)
        _run(
            "docker", "swarm", "init", "--advertise-addr", addr, "--listen-addr", f"{addr}:2377",
            "--default-addr-pool", "198.18.212.0/24", "--default-addr-pool-mask-length", "26",
        )  # fmt: skip
    except BaseException:
        _run("ip", "link", "del", host_if, check=False)
        raise
    return made


def _leave_swarm(client: docker.DockerClient, made: dict[str, object]) -> None:
    try:
        others = [s.name for s in client.services.list() if not _ours(s.name)]
        others += [c.name for c in client.configs.list() if not _ours(c.name)]
        others += [s.name for s in client.secrets.list() if not _ours(s.name)]
        if others:  # someone else started using the swarm we made: leave it to them
            print(f"swarm: NOT leaving, it now holds others' objects: {others}", flush=True)
            return
        started = time.monotonic()
        _run("docker", "swarm", "leave", "--force")
        print(f"swarm: left ({time.monotonic() - started:.1f} s)", flush=True)
        if not made["gwbridge_existed"]:
            deadline = time.monotonic() + 15
            while _run("docker", "network", "rm", "docker_gwbridge", check=False).returncode != 0:
                if not client.networks.list(names=["docker_gwbridge"]) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    finally:
        _run("ip", "link", "del", str(made["veth"]), check=False)


@pytest.fixture(scope="module")
def image_id(engine):
    """By ID, so that a task never tries to pull it (the engine skips the pull for an ID)."""
    return engine.images.get(IMAGE).id


@pytest.fixture
def lock(engine):
    """A fresh lock name; its config (made by the replicas or the test) is removed at the end."""
    name = f"{PREFIX}-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(docker.errors.NotFound):
        engine.api.remove_config(name)


def released(engine, name: str) -> None:
    """The state a graceful release leaves: the config exists with holder ""."""
    engine.api.create_config(name, b"test lock\n", labels={HOLDER: "", RENEWALS: "0"})


def labels(engine, name: str) -> dict[str, str]:
    return engine.api.inspect_config(name)["Spec"].get("Labels") or {}


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
import asyncio, sys
listen, target = sys.argv[1], sys.argv[2]
async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
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
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
async def main():
    server = await asyncio.start_unix_server(handle, listen)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

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
        self.proxy = subprocess.Popen(
            [sys.executable, "-c", PROXY, str(self.sock), _engine_socket()], stdout=subprocess.PIPE, text=True
        )
        ready, _, _ = select.select([self.proxy.stdout], [], [], 20)
        assert ready and self.proxy.stdout.readline().strip() == "READY", "proxy did not start"
        env = {
            **os.environ,
            "AGENT_ID": "swarm-test",
            "CONTROL_PLANE_URL": "ws://127.0.0.1:1",
            "AGENT_TOKEN": "ssa_test",
            "HA_BACKEND": "swarm",
            "HA_LOCK_NAME": lock,
            "HA_SWARM_DOCKER_HOST": f"unix://{self.sock}",
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

    def freeze(self) -> None:
        self.proxy.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proxy.send_signal(signal.SIGCONT)

    def close(self) -> None:
        for proc in (self.proc, self.proxy):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(10)
        if self.proxy.stdout:
            self.proxy.stdout.close()


@pytest.fixture
def replicas(lock):
    workdir = Path(tempfile.mkdtemp(prefix="ssw", dir="/tmp"))  # short: unix socket paths
    started: list[Replica] = []

    def start(count: int) -> list[Replica]:
        started.extend(Replica(workdir, len(started) + n, lock) for n in range(count))
        return started

    yield start
    for replica in started:
        replica.close()
    for replica in started:
        print(f"--- replica {replica.n} ({replica.identity}) ---\n{replica.stderr.read_text()[-3000:]}")
    shutil.rmtree(workdir, ignore_errors=True)


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
    a, b = (SwarmLeadership(name=lock, identity=i, lease_duration=LEASE, renew_deadline=DEADLINE,
                            retry_period=RETRY) for i in ("cand-a", "cand-b"))  # fmt: skip
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
    a.close()
    b.close()


# --- replicas ------------------------------------------------------------------------


def test_one_of_three_leads_and_a_killed_leader_is_replaced_within_the_lease(engine, lock, replicas):
    group = replicas(3)  # no config yet: they create it, then wait out its silence like any holder's
    started = time.time()
    (leader,) = wait_until("a first leader", lambda: leaders(group), LEASE + 15)
    print(f"first leader after {time.time() - started:.2f} s (fresh config: one lease of silence)")
    assert leader.leads()[0] - started >= LEASE - 0.1  # nobody took the fresh, holder-less config at once
    renewals = int(labels(engine, lock)[RENEWALS])

    time.sleep(LEASE + RETRY)  # over a lease: only its renewals keep the standbys waiting
    assert leaders(group) == [leader]
    assert [len(r.leads()) for r in group].count(0) == 2
    record = labels(engine, lock)
    assert record[HOLDER] == leader.identity
    assert int(record[RENEWALS]) >= renewals + 4  # renewed about every retry period

    killed = leader.kill()  # no release: the record keeps its holder
    standbys = [r for r in group if r is not leader]
    (successor,) = wait_until("a successor", lambda: leaders(standbys), LEASE + RETRY + 5)
    took = successor.leads()[0] - killed
    print(f"takeover after kill -9 of the leader: {took:.2f} s")
    assert LEASE - RETRY - 0.3 <= took <= LEASE + RETRY + 0.5, took
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
    leader.freeze()  # its engine calls now hang unanswered
    end, why = wait_until("the cut-off leader steps down", lambda: leader.ends(), DEADLINE + 2)[0]
    standbys = [r for r in group if r is not leader]
    (successor,) = wait_until("a successor", lambda: leaders(standbys), LEASE + RETRY + 3)
    start = successor.leads()[0]
    print(
        f"cut off: stepped down after {end - cut:.2f} s, successor after {start - cut:.2f} s, gap {start - end:.2f} s"
    )
    assert why == "lost"
    assert end - cut <= DEADLINE + 0.3  # its renew deadline ran from its last renewal, sent before the cut
    assert start - end >= LEASE - DEADLINE - 0.4  # fenced: nobody else acts until well after it stopped
    assert start - cut <= LEASE + RETRY + 0.5

    leader.thaw()  # healed: it does not grab the lock back while the successor renews
    time.sleep(LEASE + RETRY)
    assert leaders(group) == [successor] and len(leader.leads()) == 1

    # Graceful stops hand over within a retry period, until the once cut-off replica leads
    # again: the same process, never restarted.
    alive = list(group)
    for _ in range(2):
        (current,) = leaders(alive)
        alive.remove(current)
        stopped = current.terminate()
        (nxt,) = wait_until("a handover after a release", lambda: leaders(alive), RETRY + 3)
        handover = nxt.leads()[-1] - stopped
        print(f"graceful handover: {handover:.2f} s")
        assert handover <= RETRY + 0.3, handover
        if nxt is leader:
            break
    assert leaders(group) == [leader] and len(leader.leads()) == 2
    assert labels(engine, lock)[HOLDER] == leader.identity
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
        name=f"{PREFIX}-svc-{uuid.uuid4().hex[:8]}",
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
            await within_test(standby, RETRY + 2)
            await b.release()
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


def test_a_standby_without_an_engine_keeps_retrying_and_warns_once(lock, caplog, tmp_path):
    async def scenario():
        lone = candidate(lock, "lone", docker_host=f"unix://{tmp_path}/no-engine.sock")
        try:
            with pytest.raises(TimeoutError):
                await within_test(lone.acquire(), 6 * RETRY)
        finally:
            lone.close()

    with caplog.at_level("DEBUG", logger="agent_clients.leadership.swarm"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    retries = [r for r in caplog.records if "failed again" in r.getMessage()]
    assert len(warnings) == 1 and "acquire attempt failed" in warnings[0].getMessage()
    assert len(retries) >= 4  # it kept trying every retry period
