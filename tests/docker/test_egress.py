"""Egress policy of Docker desktops, probed from inside real session containers.

Every connect attempt runs in the session container as the desktop user (``docker exec
-u user``). The far ends are test hosts this module makes itself: one network namespace
behind a veth pair whose host side routes exactly the addresses below to it (a private,
a link-local and two TEST-NET "public-range" addresses), a listener on the session's own
bridge gateway (the Docker host), and a listener in another session's container. No
packet goes to any other address (the fixture checks the routes before any probe; no
name is resolved).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import uuid

import docker.errors
import pytest

from agent_clients.backends import egress as eg
from agent_clients.backends.base import BackendError
from agent_clients.backends.docker import DockerBackend, container_name, network_name, volume_name
from tests.live import wait_for

USER = "user"  # the desktop image's user
PORT = 8080
DNS_PORT = 53
PROXY_PORT = 3128
HOST_SIDE = "192.168.213.1/30"  # the host end of the veth (the test hosts' way back)
PRIVATE = "192.168.213.2"  # the far end of the veth, a 192.168/16 address
LINK_LOCAL = "169.254.213.7"
PUBLIC = "198.51.100.7"  # TEST-NET-2: the policy counts it as public
PROXY = "203.0.113.5"  # TEST-NET-3: the egress proxy of the proxy-mode test

PROBE = r"""
import socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open", s.recv(64).decode(errors="replace").strip())
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
except OSError as exc:
    print("error", exc.errno, exc.strerror)
"""

# Listens on 0.0.0.0 on each port given (inside the test namespace, or a session container):
# every connection gets a one-line banner naming the port.
LISTENER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    sel.register(s, selectors.EVENT_READ, port)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        with conn:
            conn.sendall(f"hello {key.data}\n".encode())
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def test_hosts():
    """A network namespace holding PRIVATE, LINK_LOCAL, PUBLIC and PROXY, listening on PORT,
    DNS_PORT and PROXY_PORT; removed (namespace, veth, routes, listener) even on failure."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"ssegress-{tag}", f"sseh{tag}", f"ssen{tag}"
    listener = None
    far = [PRIVATE, LINK_LOCAL, PUBLIC, PROXY]
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", HOST_SIDE, "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{PRIVATE}/30", "dev", ns_if)
        for addr in far[1:]:
            sh("ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", ns_if)
            sh("ip", "route", "replace", f"{addr}/32", "dev", host_if)  # a crashed run may have left it
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", ns_if, "up")
        for addr in far:  # every probed address leads into the namespace, nowhere else
            route = subprocess.run(["ip", "route", "get", addr], capture_output=True, text=True, check=True).stdout
            assert f"dev {host_if}" in route, route
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER, str(PORT), str(DNS_PORT), str(PROXY_PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout.readline().strip() == "ready"
        yield
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
        for addr in far[1:]:
            subprocess.run(["ip", "route", "del", f"{addr}/32", "dev", host_if], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module", autouse=True)
def no_rules_left_behind(docker_client, agent_id):
    """After the module: no egress chain or jump of this run's agent is left on the host."""
    yield
    assert eg.IptablesEgress().sessions(agent_id) == set()


@contextlib.contextmanager
def listening_on(host: str, port: int = 0):
    """A listener in this process on ``host`` (on ``port``, else a port of its own); yields the port."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"hello gateway\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def probe(docker_client, sid: str, host: str, port: int) -> str:
    """Connect from inside the session container, as the desktop user: "open <banner>",
    "refused", "timeout" or "error ..."."""
    out = docker_client.containers.get(container_name(sid)).exec_run(
        ["python3", "-c", PROBE, host, str(port)], user=USER
    )
    return out.output.decode().strip()


def gateway(docker_client, sid: str) -> str:
    net = docker_client.networks.get(network_name(sid))
    return net.attrs["IPAM"]["Config"][0]["Gateway"]


def address(docker_client, sid: str) -> str:
    c = docker_client.containers.get(container_name(sid))
    return c.attrs["NetworkSettings"]["Networks"][network_name(sid)]["IPAddress"]


def chains(backend, sid: str) -> eg.Chains:
    return eg.Chains.of(backend.agent_id, sid)


@pytest.fixture
def make_backend(docker_client, agent_id):
    def make(**kwargs) -> DockerBackend:
        return DockerBackend(docker_client, agent_id=agent_id, max_sessions=20, rfb_timeout=30, **kwargs)

    return make


def test_by_default_only_the_public_internet_is_reachable(test_hosts, docker_client, backend, new_session):
    other = new_session()
    backend.create(other)
    other_box = docker_client.containers.get(container_name(other.session_id))
    other_box.exec_run(["python3", "-c", LISTENER, "8081"], user=USER, detach=True)
    wait_for(lambda: probe(docker_client, other.session_id, "127.0.0.1", 8081).startswith("open"), timeout=20)

    spec = new_session()
    backend.create(spec)
    sid = spec.session_id
    assert probe(docker_client, sid, PUBLIC, PORT) == f"open hello {PORT}"
    with listening_on(gateway(docker_client, sid)) as port:
        assert probe(docker_client, sid, gateway(docker_client, sid), port) == "refused"
    with listening_on(gateway(docker_client, other.session_id)) as port:  # another bridge's gateway
        assert probe(docker_client, sid, gateway(docker_client, other.session_id), port) == "refused"
    assert probe(docker_client, sid, address(docker_client, other.session_id), 8081) == "refused"
    assert probe(docker_client, sid, PRIVATE, PORT) == "refused"
    assert probe(docker_client, sid, LINK_LOCAL, PORT) == "refused"
    # The listener of the other session is up: reachable from its own container.
    assert probe(docker_client, other.session_id, "127.0.0.1", 8081) == "open hello 8081"
    # No IPv6 in the desktop at all (the rules are IPv4 rules).
    box = docker_client.containers.get(container_name(sid))
    assert box.exec_run(["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"], user=USER).output.strip() == b"1"
    assert box.exec_run(["python3", "-c", "import socket; socket.socket(socket.AF_INET6).connect(('::1', 1))"],
                        user=USER).exit_code != 0  # fmt: skip


def test_egress_none_reaches_nothing(test_hosts, docker_client, backend, new_session):
    spec = new_session(egress="none")
    backend.create(spec)
    sid = spec.session_id
    for host, port in ((PUBLIC, PORT), (PROXY, PROXY_PORT), (PRIVATE, PORT), (LINK_LOCAL, PORT), (PRIVATE, DNS_PORT)):
        assert probe(docker_client, sid, host, port) == "refused", (host, port)
    with listening_on(gateway(docker_client, sid)) as port:
        assert probe(docker_client, sid, gateway(docker_client, sid), port) == "refused"


def test_an_allow_entry_opens_a_private_address_and_nothing_else(test_hosts, docker_client, backend, new_session):
    spec = new_session(egress_allow=(f"{PRIVATE}:{PORT}", "169.254.213.0/24:9"))
    backend.create(spec)
    sid = spec.session_id
    assert probe(docker_client, sid, PRIVATE, PORT) == f"open hello {PORT}"
    assert probe(docker_client, sid, PRIVATE, DNS_PORT) == "refused"  # another port of it
    assert probe(docker_client, sid, LINK_LOCAL, PORT) == "refused"  # only port 9 there


def test_a_bare_port_opens_public_addresses_only(test_hosts, docker_client, backend, new_session):
    """Found by review: a bare port (``"8080"``) rendered an ACCEPT with no destination ahead
    of the REJECTs, so a "none plus port" template reached the metadata address, the LAN and
    the Docker host on that port."""
    spec = new_session(egress="none", egress_allow=(str(PORT),))
    backend.create(spec)
    sid = spec.session_id
    assert probe(docker_client, sid, PUBLIC, PORT) == f"open hello {PORT}"
    assert probe(docker_client, sid, PRIVATE, PORT) == "refused"
    assert probe(docker_client, sid, LINK_LOCAL, PORT) == "refused"
    with listening_on(gateway(docker_client, sid), PORT) as port:
        assert probe(docker_client, sid, gateway(docker_client, sid), port) == "refused"
    assert probe(docker_client, sid, PUBLIC, DNS_PORT) == "refused"  # other ports: nothing


def test_dns_goes_to_the_agents_resolvers_only(test_hosts, docker_client, make_backend, new_session):
    b = make_backend(egress_dns=[PRIVATE])
    spec = new_session(b=b)
    b.create(spec)
    assert probe(docker_client, spec.session_id, PRIVATE, DNS_PORT) == f"open hello {DNS_PORT}"
    assert probe(docker_client, spec.session_id, PRIVATE, PORT) == "refused"


def test_proxy_mode_reaches_the_proxy_only(test_hosts, docker_client, make_backend, new_session):
    b = make_backend(egress_proxy=f"{PROXY}:{PROXY_PORT}")
    spec = new_session(b=b, egress="proxy")
    b.create(spec)
    sid = spec.session_id
    assert probe(docker_client, sid, PROXY, PROXY_PORT) == f"open hello {PROXY_PORT}"
    assert probe(docker_client, sid, PROXY, PORT) == "refused"
    assert probe(docker_client, sid, PUBLIC, PORT) == "refused"
    env = docker_client.containers.get(container_name(sid)).exec_run(["env"], user=USER).output.decode()
    assert f"HTTPS_PROXY=http://{PROXY}:{PROXY_PORT}" in env.splitlines()


def test_proxy_mode_without_a_proxy_is_refused_before_anything_is_made(docker_client, backend, new_session):
    spec = new_session(egress="proxy")
    with pytest.raises(BackendError, match="EGRESS_PROXY"):
        backend.create(spec)
    with pytest.raises(docker.errors.NotFound):
        docker_client.networks.get(network_name(spec.session_id))


def test_rules_are_idempotent_survive_hibernate_and_go_with_terminate(test_hosts, docker_client, backend, new_session):
    spec = new_session()
    sid = spec.session_id
    backend.create(spec)
    rules = backend.firewall.rules_of(chains(backend, sid))
    assert len([r for r in rules if r.startswith(("-A INPUT", "-A DOCKER-USER"))]) == 2
    backend.create(spec)  # a repeated create
    assert backend.firewall.rules_of(chains(backend, sid)) == rules
    backend.hibernate(sid)
    assert backend.firewall.rules_of(chains(backend, sid)) == rules
    backend.wake(sid)
    assert backend.firewall.rules_of(chains(backend, sid)) == rules
    assert probe(docker_client, sid, PRIVATE, PORT) == "refused"
    backend.terminate(sid, keep_home=True)
    assert backend.firewall.rules_of(chains(backend, sid)) == []
    assert sid not in backend.firewall.sessions(backend.agent_id)
    docker_client.volumes.get(volume_name(sid)).remove()


def test_a_restarted_agent_reasserts_the_rules_of_its_sessions(test_hosts, docker_client, make_backend, new_session):
    first = make_backend()
    spec = new_session(b=first)
    first.create(spec)
    sid = spec.session_id
    rules = first.firewall.rules_of(chains(first, sid))
    first.firewall.remove(chains(first, sid))  # the host's firewall was flushed (a reboot, an admin)
    assert probe(docker_client, sid, PRIVATE, PORT) == f"open hello {PORT}"  # what the rules are for
    restarted = make_backend()
    assert f"egress rules of {sid}" in restarted.maintain()
    assert restarted.firewall.rules_of(chains(restarted, sid)) == rules
    assert probe(docker_client, sid, PRIVATE, PORT) == "refused"


def test_rules_a_firewall_reload_drops_while_the_agent_runs_are_put_back_by_its_upkeep(
    test_hosts, docker_client, backend, new_session
):
    """Found by review: the rules were re-asserted only when the agent started, so a
    firewall reload (a DOCKER-USER jump gone) left a running desktop with open egress
    until its next wake. The runtime calls maintain() after every hello and GC round."""
    spec = new_session()
    sid = spec.session_id
    backend.create(spec)
    assert backend.maintain() == []  # all there: nothing to do
    rules = backend.firewall.rules_of(chains(backend, sid))
    jump = next(r for r in rules if r.startswith("-A DOCKER-USER"))
    subprocess.run(["iptables", "-w", *("-D" + jump[2:]).replace('"', "").split()], check=True)
    assert probe(docker_client, sid, PRIVATE, PORT) == f"open hello {PORT}"  # the hole
    assert backend.maintain() == [f"egress rules of {sid}"]
    assert backend.firewall.rules_of(chains(backend, sid)) == rules
    assert probe(docker_client, sid, PRIVATE, PORT) == "refused"
    subprocess.run(["iptables", "-w", "-F", chains(backend, sid).forward], check=True)  # a flush
    assert backend.maintain() == [f"egress rules of {sid}"]
    assert probe(docker_client, sid, PRIVATE, PORT) == "refused"


def test_the_garbage_collector_removes_rules_left_behind(test_hosts, docker_client, backend, new_session):
    spec = new_session()
    sid = spec.session_id
    backend.create(spec)
    # The agent died half-way through a terminate: container and network gone, rules left.
    docker_client.containers.get(container_name(sid)).remove(force=True)
    docker_client.networks.get(network_name(sid)).remove()
    assert sid in backend.session_ids_found()
    removed = backend.collect_garbage({sid}, set(), grace=0)
    assert f"egress rules {sid}" in removed
    assert backend.firewall.rules_of(chains(backend, sid)) == []
    assert sid not in backend.firewall.sessions(backend.agent_id)


def test_without_iptables_the_create_fails_and_leaves_nothing(docker_client, make_backend, new_session):
    """The agent's host lacks the iptables command (a real condition: the configured
    command does not exist)."""
    b = make_backend(firewall=eg.IptablesEgress(iptables="iptables-not-installed"))
    spec = new_session(b=b)
    with pytest.raises(BackendError, match="iptables-not-installed is not installed") as err:
        b.create(spec)
    assert "not started" in err.value.message
    for get, name in (
        (docker_client.containers.get, container_name(spec.session_id)),
        (docker_client.networks.get, network_name(spec.session_id)),
        (docker_client.volumes.get, volume_name(spec.session_id)),
    ):
        with pytest.raises(docker.errors.NotFound):
            get(name)


def test_allow_entries_are_validated():
    assert [str(r) for r in eg.parse_allow(["10.0.0.0/8", "10.1.2.3:443", "443", "10.1.2.3/24:80"])] == [
        "10.0.0.0/8",
        "10.1.2.3/32:443",
        "443",
        "10.1.2.0/24:80",
    ]
    for bad in ("", "10.0.0.0/33", "10.1.2.3:0", "10.1.2.3:70000", "example.com:443", "fd00::/8", "1.2.3.4:80:1"):
        with pytest.raises(ValueError):
            eg.parse_allow([bad])
