"""Homes behind NAT routers, in Linux network namespaces (iproute2 + nftables, as root).

The topology (``Topology``), every address inside namespaces it makes::

    "internet": bridge br0 in namespace <prefix>-net, 10.200.0.0/24, no default route
      boot    10.200.0.2        a bootstrap node (``dhtshare bootstrap``)
      public  10.200.0.3        a public member
      r-keep1 10.200.0.11  -- LAN 10.201.1.0/24 -- keep1  10.201.1.2
                                                  mate   10.201.1.3 (keep1's LAN-mate)
      r-keep2 10.200.0.12  -- LAN 10.201.2.0/24 -- keep2  10.201.2.2
      r-rand  10.200.0.13  -- LAN 10.201.3.0/24 -- rand   10.201.3.2

Each router masquerades its LAN behind its WAN address. keep1 and keep2's routers use
plain ``masquerade``, which keeps a flow's source port whenever that port is free on the
WAN address (so one local port maps to the same public port toward every destination, as
home routers do). rand's router uses ``masquerade random``: the kernel then never keeps
the source port and draws a random free port for each new flow (older kernels: one
derived from a keyed hash of the addresses and the destination port), so one port maps to a
different public port toward each destination (tests/test_nat_topology.py checks it).
``fully-random`` behaves the same for source NAT here, and ``persistent`` only pins the
source *address* of a multi-address pool: plain ``random`` is the NAT no punch gets
through. Each router's LAN is a bridge, so hosts on one LAN (keep1 and mate) reach each
other directly. The routers' filter: forwarding is dropped except LAN -> WAN, LAN ->
LAN (bridged traffic passes the forward hook where br_netfilter is loaded) and
established/related replies; input to the router itself likewise (nothing listens
there), so unsolicited inbound traffic is dropped silently, with no RST.

Every namespace is named ``dhts-<pid>-<4 hex>-<role>``: parallel runs never collide, and
``reap_stale()`` deletes the namespaces of runs whose process is gone (killing what still
runs in them). ``Nodes`` runs real ``dhtshare`` processes in the hosts (``ip netns
exec``), each node with its own ``--home``; their control sockets are files, so the test
process talks to them directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhtshare.home import Home
from dhtshare.node import control
from support.cli import DHTSHARE, TIMEOUT, LineWatcher, default_env, run_cli

INTERNET = "10.200.0"  # the /24 of the "internet" bridge
BOOT_PORT = 4000
PUBLIC = {"boot": f"{INTERNET}.2", "public": f"{INTERNET}.3"}
#: private host -> (router's WAN address, LAN /24 (its .1 the router, .2 the host), masquerade)
PRIVATE = {
    "keep1": (f"{INTERNET}.11", "10.201.1", "masquerade"),
    "keep2": (f"{INTERNET}.12", "10.201.2", "masquerade"),
    "rand": (f"{INTERNET}.13", "10.201.3", "masquerade random"),
}
#: a second host on a private host's LAN (behind the same router): host -> (that host, .N)
LAN_MATES = {"mate": ("keep1", 3)}
ROLES = (*PUBLIC, *PRIVATE, *LAN_MATES)
_ALL_ROLES = ("net", *ROLES, *(f"r-{role}" for role in PRIVATE))
_NAME = re.compile(rf"^dhts-(\d+)-[0-9a-f]{{4}}-({'|'.join(_ALL_ROLES)})$")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why the topology cannot be built here (not root, no ``ip`` or ``nft``), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 nftables)"
    return None


def sh(*cmd: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run one command (no shell) with its output captured; raise on failure if ``check``."""
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def _pids_in(ns: str) -> list[int]:
    out = sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _delete(ns: str) -> None:
    """Kill what runs in ``ns`` (by pid), then delete it."""
    for pid in _pids_in(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sh("ip", "netns", "del", ns, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Delete the namespaces an earlier ``Topology`` made whose creating process is gone."""
    gone = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split(" ", 1)[0]
        if (m := _NAME.match(name)) and not _alive(int(m.group(1))):
            _delete(name)
            gone.append(name)
    return gone


def router_rules(masquerade: str) -> str:
    """The nftables ruleset of a home router (``masquerade``: that statement)."""
    return f"""
table inet nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" {masquerade}
  }}
}}
table inet filter {{
  chain input {{
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
    ct state established,related accept
    iifname "lan" accept
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
    iifname "lan" oifname "lan" accept
  }}
}}
"""


@dataclass
class Topology:
    """The namespaces, links, addresses and NAT rules above; ``close()`` removes them all."""

    prefix: str = field(default_factory=lambda: f"dhts-{os.getpid()}-{secrets.token_hex(2)}")
    made: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        """The namespace of a host (``boot``, ``public``, ``keep1``...), a router
        (``r-keep1``...) or the bridge (``net``)."""
        return f"{self.prefix}-{role}"

    @staticmethod
    def address(role: str) -> str:
        """The host's own address (a private host's LAN address)."""
        if role in LAN_MATES:
            behind, index = LAN_MATES[role]
            return f"{PRIVATE[behind][1]}.{index}"
        return PUBLIC[role] if role in PUBLIC else f"{PRIVATE[role][1]}.2"

    @staticmethod
    def public_ip(role: str) -> str:
        """The address the internet sees the host as (a private host's router WAN)."""
        role = LAN_MATES[role][0] if role in LAN_MATES else role
        return PUBLIC[role] if role in PUBLIC else PRIVATE[role][0]

    def _add(self, role: str) -> str:
        ns = self.ns(role)
        sh("ip", "netns", "add", ns)
        self.made.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def build(self) -> Topology:
        reap_stale()
        try:
            net = self._add("net")
            sh("ip", "-n", net, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", net, "link", "set", "br0", "up")
            for role, ip in PUBLIC.items():
                self._plug(net, self._add(role), role, "eth0", ip)
            for role, (wan, lan, masquerade) in PRIVATE.items():
                router = self._add(f"r-{role}")
                self._plug(net, router, role, "wan", wan)
                sh("ip", "-n", router, "link", "add", "lan", "type", "bridge")
                self._up(router, "lan", f"{lan}.1")
                mates = [(m, i) for m, (behind, i) in LAN_MATES.items() if behind == role]
                for host_role, index in [(role, 2), *mates]:
                    host, port = self._add(host_role), f"l-{host_role}"[:15]
                    veth = ("type", "veth", "peer", "name", "eth0", "netns", host)
                    sh("ip", "-n", router, "link", "add", port, *veth)
                    sh("ip", "-n", router, "link", "set", port, "master", "lan", "up")
                    self._up(host, "eth0", f"{lan}.{index}")
                    sh("ip", "-n", host, "route", "add", "default", "via", f"{lan}.1")
                sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
                self.set_nat(role, masquerade)
        except BaseException:
            self.close()
            raise
        return self

    def _plug(self, net: str, ns: str, role: str, name: str, ip: str) -> None:
        """A veth from ``ns`` (named ``name``) to a port of the bridge."""
        port = f"p-{role}"[:15]
        sh("ip", "-n", net, "link", "add", port, "type", "veth", "peer", "name", name, "netns", ns)
        sh("ip", "-n", net, "link", "set", port, "master", "br0", "up")
        self._up(ns, name, ip)

    @staticmethod
    def _up(ns: str, name: str, ip: str) -> None:
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", name)
        sh("ip", "-n", ns, "link", "set", name, "up")

    def set_nat(self, role: str, masquerade: str) -> None:
        """Replace the ruleset of ``role``'s router (``"masquerade"``, ``"masquerade random"``).
        Flows the router already tracks keep their mapping; new flows get the new rule."""
        router = self.ns(f"r-{role}")
        sh("ip", "netns", "exec", router, "nft", "flush", "ruleset")
        subprocess.run(
            ["ip", "netns", "exec", router, "nft", "-f", "-"],
            input=router_rules(masquerade),
            text=True,
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )

    def set_udp_timeout(self, role: str, seconds: int) -> None:
        """``role``'s router forgets a UDP mapping idle for ``seconds`` (Linux: 30 s for a
        flow seen one way or briefly, 120 s for a lasting one; both set to ``seconds``)."""
        router = self.ns(f"r-{role}")
        for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            sh("ip", "netns", "exec", router, "sysctl", "-qw", f"net.netfilter.{key}={seconds}")

    def udp_mappings(self, role: str, port: int) -> set[int]:
        """The public ports ``role``'s router maps the host's UDP ``port`` to right now."""
        table = sh("ip", "netns", "exec", self.ns(f"r-{role}"), "cat", "/proc/net/nf_conntrack")
        mapped = set()
        for line in table.stdout.splitlines():
            words = line.split()
            if "udp" not in words:
                continue
            # two tuples: original (host -> peer), then reply (peer -> the public port)
            sports = [w[6:] for w in words if w.startswith("sport=")]
            dports = [w[6:] for w in words if w.startswith("dport=")]
            if len(sports) == 2 == len(dports) and sports[0] == str(port):
                mapped.add(int(dports[1]))
        return mapped

    def rules(self, role: str) -> str:
        return sh("ip", "netns", "exec", self.ns(f"r-{role}"), "nft", "list", "ruleset").stdout

    def argv(self, role: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *cmd]

    def run(self, role: str, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """``cmd`` in ``role``'s namespace, output captured."""
        kw.setdefault("timeout", TIMEOUT)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(role, *cmd), capture_output=True, text=True, **kw)

    def popen(self, role: str, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(role, *cmd), text=True, **kw)

    def socket(self, role: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """A new IPv4 socket in ``role``'s namespace (it stays there wherever it is used).

        The calling thread enters the namespace for the ``socket()`` call only (a thread's
        network namespace is its own)."""
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/var/run/netns/{self.ns(role)}", os.O_RDONLY)
        try:
            if _libc.setns(there, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.ns(role)}")
            try:
                return socket.socket(socket.AF_INET, kind)
            finally:
                if _libc.setns(here, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(here)
            os.close(there)

    def close(self) -> None:
        """Kill every process left in the namespaces, then delete them (the bridge last)."""
        for ns in reversed(self.made):
            _delete(ns)
        self.made.clear()


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    topo = Topology().build()
    try:
        yield topo
    finally:
        topo.close()


class Echo:
    """UDP and TCP servers on one port in a host: each answers a datagram or a connection
    with the source address it saw, as ``IP:port`` (the NAT mapping, seen from outside)."""

    def __init__(self, topo: Topology, role: str, port: int = 7000) -> None:
        self.host, self.port = topo.address(role), port
        self.udp = topo.socket(role, socket.SOCK_DGRAM)
        self.tcp = topo.socket(role, socket.SOCK_STREAM)
        self.udp.bind((self.host, port))
        self.tcp.bind((self.host, port))
        self.tcp.listen(16)
        self._threads = [
            threading.Thread(target=self._udp, daemon=True),
            threading.Thread(target=self._tcp, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _udp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                data, src = self.udp.recvfrom(2048)
                if not data or src is None:
                    return  # shut down
                self.udp.sendto(f"{src[0]}:{src[1]}".encode(), src)

    def _tcp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, src = self.tcp.accept()
                with conn:
                    conn.sendall(f"{src[0]}:{src[1]}".encode())

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(TIMEOUT)


def udp_observed(
    topo: Topology, role: str, echo: Echo, sport: int = 0, timeout: float = 2.0
) -> str | None:
    """``IP:port`` ``echo`` saw a datagram from ``role`` (bound to ``sport``) come from."""
    with topo.socket(role, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", sport))
        s.settimeout(timeout)
        s.sendto(b"?", (echo.host, echo.port))
        try:
            return s.recv(2048).decode()
        except TimeoutError:
            return None


def tcp_observed(
    topo: Topology, role: str, echo: Echo, sport: int = 0, timeout: float = 2.0
) -> str | None:
    """``IP:port`` ``echo`` saw a TCP connection from ``role`` (bound to ``sport``) come from."""
    with topo.socket(role, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.settimeout(timeout)
        try:
            s.connect((echo.host, echo.port))
            return s.recv(2048).decode()
        except (TimeoutError, OSError):
            return None


# ------------------------------------------------------------------ dhtshare processes


@dataclass
class Nodes:
    """``dhtshare`` processes in a ``Topology``: the bootstrap node in ``boot`` and one node
    per other host, each with its own ``--home`` under ``root``."""

    topo: Topology
    root: Path
    env: dict[str, str] = field(default_factory=default_env)
    pids: dict[str, int] = field(default_factory=dict)
    boot: subprocess.Popen[str] | None = None
    boot_log: LineWatcher | None = None

    @property
    def bootstrap(self) -> str:
        return f"{PUBLIC['boot']}:{BOOT_PORT}"

    def home(self, role: str) -> Path:
        return self.root / role

    def start_bootstrap(self, *extra: str) -> str:
        """``dhtshare bootstrap`` (``extra``: e.g. ``--relay``) in ``boot``; its id once it
        listens."""
        cmd = [str(DHTSHARE), "bootstrap", "--port", str(BOOT_PORT)]
        cmd += ["--state", str(self.root / "boot"), *extra]
        self.boot = self.topo.popen(
            "boot", *cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env
        )
        self.boot_log = LineWatcher(self.boot)
        return self.boot_log.wait_for(r"bootstrap node ([0-9a-f]{40}) listening").group(1)

    def argv(self, role: str, *args: str) -> list[str]:
        return self.topo.argv(role, str(DHTSHARE), "--home", str(self.home(role)), *args)

    def run(
        self, role: str, *args: str, check: bool = True, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``dhtshare --home <role's> ARGS`` in the host's namespace."""
        return run_cli(self.argv(role, *args), self.env, self.root, check=check, timeout=timeout)

    def json(self, role: str, *args: str) -> Any:
        return json.loads(self.run(role, *args, "--json").stdout)

    def popen(self, role: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(role, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
        )

    def start(self, role: str, *extra: str) -> subprocess.Popen[str]:
        """``node start --detach --bootstrap <boot>`` (``extra`` added); see ``started``."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not Home(self.home(role)).identity.exists():
            self.run(role, "id", "create", "--name", role)
        return self.popen(role, "node", "start", "--detach", "--bootstrap", self.bootstrap, *extra)

    def started(self, role: str, proc: subprocess.Popen[str]) -> int:
        """The pid of the node ``proc`` started (it must have succeeded)."""
        out, err = proc.communicate(timeout=TIMEOUT * 3)
        m = re.search(r"\(pid (\d+)\)", out)
        if m:
            self.pids[role] = int(m.group(1))
        assert proc.returncode == 0 and m, f"{role}: node start: {err.strip()}"
        return int(m.group(1))

    def call(self, role: str, cmd: str, **args: Any) -> Any:
        """One control command (``status``, ``downloads``...) straight to the node's socket."""
        path = control.socket_path(Home(self.home(role)))
        return asyncio.run(control.call(path, cmd, args))

    def status(self, role: str) -> dict[str, Any]:
        """``node status`` straight from the control socket."""
        doc = self.call(role, "status")
        assert isinstance(doc, dict), doc
        return doc

    def wait_status(
        self, role: str, ready: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Poll ``status`` (every 0.2 s) until ``ready(doc)``; the last doc on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status(role)
            if ready(doc) or time.monotonic() > deadline:
                return doc
            time.sleep(0.2)

    def close(self) -> None:
        """``node stop`` each node, then SIGKILL what is left (the namespaces' ``close``
        kills anything still inside them)."""
        stops = [
            subprocess.Popen(
                [str(DHTSHARE), "--home", str(self.home(role)), "node", "stop"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self.env,
                stdin=subprocess.DEVNULL,
            )
            for role in self.pids
        ]
        for proc in stops:
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        if self.boot is not None:
            if self.boot.poll() is None:
                self.boot.send_signal(signal.SIGTERM)
                try:
                    self.boot.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.boot.kill()
                    self.boot.wait()
            if self.boot_log is not None:
                self.boot_log.join()
            if self.boot.stderr is not None:
                self.boot.stderr.close()
            self.boot = None


@contextlib.contextmanager
def nodes(topo: Topology, root: Path) -> Iterator[Nodes]:
    n = Nodes(topo, root)
    try:
        yield n
    finally:
        n.close()
