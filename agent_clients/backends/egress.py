"""Egress policy of a desktop: what a session's container may reach on the network.

A template's ``egress`` is one of:

* ``internet`` (default): anything public; never the Docker host itself, the private and
  special ranges of :data:`BLOCKED_V4` (other sessions, the LAN, link-local and with it the
  cloud metadata address 169.254.169.254), except DNS to the agent's resolvers;
* ``none``: nothing at all;
* ``proxy``: only the agent's egress proxy (``EGRESS_PROXY``, ``ip:port``); the desktop
  gets ``HTTP_PROXY``/``HTTPS_PROXY`` pointing at it.

``egress_allow`` entries open more on top of any mode: ``CIDR`` (every port),
``CIDR:port`` (TCP and UDP to that port) or a bare ``port`` (that port on public
addresses: never the Docker host, the private or special ranges).

This module is pure Python (no Django): the control plane validates template fields with
:func:`parse_allow` and the agents render rules from the same parse. On Docker the rules
are iptables chains (:class:`IptablesEgress`); on Kubernetes a NetworkPolicy
(``agent_clients.backends.k8s_manifests.make_network_policy``).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

MODES = ("internet", "none", "proxy")
DEFAULT_MODE = "internet"
MAX_ALLOW = 64

# Never reachable in mode "internet": RFC 1918, shared address space (100.64/10, carrier
# NAT), link-local (169.254/16, the metadata services), "this network", loopback,
# IETF protocol assignments, multicast and reserved. The TEST-NETs (192.0.2/24,
# 198.51.100/24, 203.0.113/24) count as public.
BLOCKED_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


class EgressError(Exception):
    """The policy could not be enforced (iptables missing, refused, ...)."""


class IptablesMissing(EgressError):
    """The iptables command is not installed (so this agent cannot have made any rule)."""


@dataclass(frozen=True)
class AllowRule:
    """One ``egress_allow`` entry: a network (None: every address) and a port (None: all)."""

    network: str | None
    port: int | None

    def __str__(self) -> str:
        if self.network is None:
            return str(self.port)
        return self.network if self.port is None else f"{self.network}:{self.port}"


_PORT = re.compile(r"^[0-9]{1,5}$")


def _port(raw: str, entry: str) -> int:
    if not _PORT.match(raw) or not 1 <= int(raw) <= 65535:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(raw)


def parse_allow_entry(entry: object) -> AllowRule:
    """``"10.1.2.0/24"``, ``"10.1.2.3:443"``, ``"10.1.2.0/24:443"`` or ``"443"``; raises
    ValueError with a sentence naming the entry otherwise."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{entry!r}: expected a string such as 10.0.0.0/8, 10.1.2.3:443 or 443")
    text = entry.strip()
    if _PORT.match(text):
        return AllowRule(None, _port(text, entry))
    net_text, sep, port_text = text.rpartition(":") if text.count(":") == 1 else ("", "", "")
    if not sep:
        net_text, port_text = text, ""
    if ":" in net_text or (not sep and ":" in text):
        raise ValueError(f"{entry!r}: IPv6 is not supported (session networks are IPv4 only)")
    try:
        network = ipaddress.IPv4Network(net_text, strict=False)
    except ValueError:
        raise ValueError(f"{entry!r}: expected an IPv4 address or CIDR such as 10.0.0.0/8, optionally :port") from None
    return AllowRule(str(network), _port(port_text, entry) if sep else None)


def parse_allow(entries: object) -> tuple[AllowRule, ...]:
    """A whole ``egress_allow`` list (at most MAX_ALLOW entries), or ValueError."""
    if entries is None:
        return ()
    if not isinstance(entries, (list, tuple)):
        raise ValueError('expected a list of strings such as ["10.0.0.0/8", "10.1.2.3:443", "443"]')
    if len(entries) > MAX_ALLOW:
        raise ValueError(f"at most {MAX_ALLOW} entries, got {len(entries)}")
    return tuple(parse_allow_entry(e) for e in entries)


def parse_proxy(raw: str | None) -> tuple[str, int] | None:
    """``EGRESS_PROXY`` (``ip:port``, an IPv4 address: the firewall needs the address)."""
    if not raw:
        return None
    host, sep, port = raw.strip().rpartition(":")
    try:
        return str(ipaddress.IPv4Address(host)), _port(port, raw) if sep else _port("", raw)
    except ValueError:
        raise ValueError(f"EGRESS_PROXY must be an IPv4 address and port such as 10.0.0.5:3128, got {raw!r}") from None


def check_policy(mode: str, allow: object, proxy: tuple[str, int] | None) -> tuple[str, tuple[AllowRule, ...]]:
    """A template's (egress, egress_allow) for an agent with egress proxy ``proxy``: the mode
    and the parsed entries, or ValueError saying what is wrong (both agents refuse a create
    with it before anything is made)."""
    rules = (check_mode(mode), parse_allow(list(allow) if isinstance(allow, (list, tuple)) else allow))
    if mode == "proxy" and proxy is None:
        raise ValueError(
            "the template's egress is 'proxy' but this agent has no egress proxy (set EGRESS_PROXY=ip:port)"
        )
    return rules


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"egress must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def proxy_env(proxy: tuple[str, int]) -> dict[str, str]:
    url = f"http://{proxy[0]}:{proxy[1]}"
    return {
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": "localhost,127.0.0.1",
        "no_proxy": "localhost,127.0.0.1",
    }


SYSTEMD_RESOLVED = "/run/systemd/resolve/resolv.conf"


def _nameservers(path: str) -> list[ipaddress.IPv4Address]:
    found = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        found.append(ipaddress.IPv4Address(parts[1]))
    except OSError:
        pass
    return found


def resolvers(path: str = "/etc/resolv.conf", resolved: str = SYSTEMD_RESOLVED) -> list[str]:
    """The IPv4 name servers dockerd forwards a session's DNS queries to, as dockerd picks
    them: on a systemd-resolved host (``path`` names only 127.0.0.53) the upstream servers
    of ``resolved``; loopback ones are left out (dockerd queries those from the host's own
    namespace, outside the rules)."""
    servers = _nameservers(path)
    if servers and all(str(a) == "127.0.0.53" for a in servers):
        servers = _nameservers(resolved)
    return [str(a) for a in servers if not a.is_loopback]


# --- Docker: iptables chains ------------------------------------------------------------

CHAIN_PREFIX = "SSE-"
_COMMENT_PREFIX = "streamspace-egress:"
_LOCK = threading.Lock()  # one host, one firewall: the agent's own changes go one at a time


def _key(agent_id: str, session_id: str) -> str:
    return hashlib.sha256(f"{agent_id}\0{session_id}".encode()).hexdigest()[:16]


def _unquoted(line: str) -> str:
    """A listing line without the quotes ``iptables -S`` puts around comments."""
    return line.replace('"', "")


def agent_tag(agent_id: str) -> str:
    return hashlib.sha256(agent_id.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Chains:
    """The two chains of one session: ``inbound`` for traffic to the host itself (INPUT:
    the bridge gateway, the host's other addresses, other bridges' gateways), ``forward``
    for traffic through the host (DOCKER-USER, jumped to from FORWARD)."""

    inbound: str
    forward: str
    comment: str

    @classmethod
    def of(cls, agent_id: str, session_id: str) -> Chains:
        key = _key(agent_id, session_id)
        return cls(
            f"{CHAIN_PREFIX}{key}-IN", f"{CHAIN_PREFIX}{key}-FW", f"{_COMMENT_PREFIX}{agent_tag(agent_id)}:{session_id}"
        )


def render_chain(
    chain: str,
    comment: str,
    mode: str,
    allow: tuple[AllowRule, ...],
    *,
    to_host: bool,
    dns: list[str],
    proxy: tuple[str, int] | None,
) -> list[str]:
    """The ``-A`` lines of one session chain, in order: replies first (the agent's VNC
    connection to the container), then what is allowed, then REJECT (a blocked connect
    fails at once instead of hanging)."""
    tag = f"-m comment --comment {comment}"
    rejects = (
        f"-p tcp {tag} -j REJECT --reject-with tcp-reset",
        f"{tag} -j REJECT --reject-with icmp-admin-prohibited",
    )

    def accept(rule: AllowRule) -> list[str]:
        dest = f" -d {rule.network}" if rule.network else ""
        if rule.port is None:
            return [f"-A {chain}{dest} {tag} -j ACCEPT"]
        return [f"-A {chain}{dest} -p {p} {tag} -m {p} --dport {rule.port} -j ACCEPT" for p in ("tcp", "udp")]

    addressed = [rule for rule in allow if rule.network is not None]  # the operator named the network
    ports_only = [rule for rule in allow if rule.network is None]  # public addresses only
    rules = [f"-A {chain} {tag} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    for rule in addressed:
        rules += accept(rule)
    if mode == "internet":
        for server in dns:
            rules += [f"-A {chain} -d {server}/32 -p {p} {tag} -m {p} --dport 53 -j ACCEPT" for p in ("udp", "tcp")]
    if mode == "proxy" and proxy is not None:
        rules.append(f"-A {chain} -d {proxy[0]}/32 -p tcp {tag} -m tcp --dport {proxy[1]} -j ACCEPT")
    if not to_host and (mode == "internet" or ports_only):
        # Never the private and special ranges (the metadata address, the LAN, other
        # sessions) unless an entry above names them; a bare port opens public ones only.
        for net in BLOCKED_V4:
            rules += [f"-A {chain} -d {net} {reject}" for reject in rejects]
        for rule in ports_only:
            rules += accept(rule)
        if mode == "internet":
            rules.append(f"-A {chain} {tag} -j RETURN")  # public: Docker's own rules decide
            return rules
    rules += [f"-A {chain} {reject}" for reject in rejects]
    return rules


class IptablesEgress:
    """Session egress rules in the host's iptables (filter table), through the
    ``iptables``/``iptables-restore`` commands (the nft or legacy flavour dockerd uses).

    Per session two chains (:class:`Chains`), jumped to with ``-i <bridge>`` from
    ``DOCKER-USER`` (forwarded traffic) and ``INPUT`` (traffic to the host itself); the
    bridge interface, not the source address, picks the session (a spoofed source cannot
    escape). Every change is one ``iptables-restore --noflush`` transaction: declaring a
    chain flushes it, so applying twice yields the same rules; jumps are added only when
    missing.
    """

    def __init__(self, iptables: str = "iptables") -> None:
        self.iptables = iptables

    def _binary(self, name: str) -> str:
        path = shutil.which(name)
        if path is None:
            raise IptablesMissing(
                f"{name} is not installed on the agent's host: the Docker agent enforces each desktop's egress "
                "policy with iptables (install the iptables package dockerd uses)"
            )
        return path

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        binary = self._binary(args[0])
        try:
            done = subprocess.run(  # an argument list, no shell
                [binary, *args[1:]], input=stdin, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EgressError(f"{args[0]} failed: {exc}") from None
        if done.returncode != 0:
            raise EgressError(f"{args[0]} refused the session's egress rules: {done.stderr.strip()[:500]}")
        return done.stdout

    def _restore_name(self) -> str:
        return self.iptables + "-restore"

    def listing(self) -> list[str]:
        """``iptables -S`` of the filter table, one rule (or ``-N``/``-P``) a line."""
        return self._run([self.iptables, "-w", "-t", "filter", "-S"]).splitlines()

    def apply(
        self,
        chains: Chains,
        bridge: str,
        mode: str,
        allow: tuple[AllowRule, ...],
        *,
        dns: list[str],
        proxy: tuple[str, int] | None,
    ) -> None:
        """Install (or re-assert) the session's rules; the same call twice = the same rules."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge):
            raise EgressError(f"invalid bridge interface name {bridge!r}")
        check_mode(mode)
        if mode == "proxy" and proxy is None:
            raise EgressError("the template's egress is 'proxy' but this agent has no EGRESS_PROXY")
        lines = ["*filter", f":{chains.inbound} - [0:0]", f":{chains.forward} - [0:0]"]
        common = {"allow": allow, "dns": dns, "proxy": proxy}
        lines += render_chain(chains.inbound, chains.comment, mode, to_host=True, **common)
        lines += render_chain(chains.forward, chains.comment, mode, to_host=False, **common)
        with _LOCK:
            current = self.listing()
            for parent, target in (("DOCKER-USER", chains.forward), ("INPUT", chains.inbound)):
                wanted = f"-A {parent} -i {bridge} -m comment --comment {chains.comment} -j {target}"
                present = [x for x in current if x.startswith(f"-A {parent} ") and x.endswith(f" -j {target}")]
                for stale in present:
                    if _unquoted(stale) != wanted:
                        lines.append("-D" + stale[2:])
                if wanted not in map(_unquoted, present):
                    lines.append(f"-I {parent} 1" + wanted[len(f"-A {parent}") :])
            lines.append("COMMIT")
            self._run([self._restore_name(), "-w", "--noflush"], "\n".join(lines) + "\n")

    def intact(
        self,
        chains: Chains,
        mode: str,
        allow: tuple[AllowRule, ...],
        *,
        dns: list[str],
        proxy: tuple[str, int] | None,
        listing: list[str],
    ) -> bool:
        """Whether ``listing`` (``iptables -S``) holds the session's two jumps and as many
        rules in each chain as its policy renders (a flush empties chains, a reload of INPUT
        or DOCKER-USER drops jumps: either reads as broken)."""
        for parent, target in (("DOCKER-USER", chains.forward), ("INPUT", chains.inbound)):
            if not any(x.startswith(f"-A {parent} ") and x.endswith(f" -j {target}") for x in listing):
                return False
        common = {"allow": allow, "dns": dns, "proxy": proxy}
        for chain, to_host in ((chains.inbound, True), (chains.forward, False)):
            wanted = len(render_chain(chain, chains.comment, mode, to_host=to_host, **common))
            if sum(1 for x in listing if x.startswith(f"-A {chain} ")) != wanted:
                return False
        return True

    def remove(self, chains: Chains, current: list[str] | None = None) -> bool:
        """Remove the session's jumps and chains; True if there was anything to remove."""
        with _LOCK:
            current = self.listing() if current is None else current
            ours = (chains.inbound, chains.forward)
            lines = ["*filter"]
            lines += ["-D" + line[2:] for line in current if line.startswith("-A ") and line.split()[-1] in ours
                      and line.split()[1] not in ours]  # fmt: skip
            existing = [c for c in ours if f"-N {c}" in current]
            lines += [f"-F {c}" for c in existing] + [f"-X {c}" for c in existing]
            if len(lines) == 1:
                return False
            lines.append("COMMIT")
            self._run([self._restore_name(), "-w", "--noflush"], "\n".join(lines) + "\n")
            return True

    def sessions(self, agent_id: str) -> set[str]:
        """The session ids of this agent that have egress chains or jumps on this host."""
        mark = f"--comment {_COMMENT_PREFIX}{agent_tag(agent_id)}:"
        found = set()
        for line in map(_unquoted, self.listing()):
            at = line.find(mark)
            if at >= 0:
                found.add(line[at + len(mark) :].split()[0])
        return found

    def rules_of(self, chains: Chains) -> list[str]:
        """Every line of the listing that belongs to the session (for tests and debugging)."""
        return [line for line in self.listing() if chains.inbound in line or chains.forward in line]
