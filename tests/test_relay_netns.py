"""A relay through real NAT routers (tests/support/netns.py): the provider sits behind the
router that maps ports at random (no hole can be punched to it), the relay is ``dhtshare
bootstrap --relay`` on the "internet", the downloader sits behind a port-keeping router.
The file arrives intact through the circuit; the relay sees the provider at its router's
public address. Also relayed against direct throughput between hosts of the topology.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import DHTSHARE, LineWatcher
from support.netns import BOOT_PORT, PUBLIC, Topology, topology, unavailable

from dhtshare.identity import Identity

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
    pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed"),
]

ROLES = Path(__file__).parent / "support" / "relay_roles.py"
SIZE = 64 * 1024 * 1024
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology() as t:
        yield t


def start(topo: Topology, role: str, what: str, args: dict[str, Any]) -> subprocess.Popen[str]:
    return topo.popen(
        role,
        sys.executable,
        str(ROLES),
        what,
        json.dumps(args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def first_line(watcher: LineWatcher) -> dict[str, Any]:
    line = watcher.wait_for(r"^\{.*\}$", timeout=TIMEOUT)
    return dict(json.loads(line.group(0)))


def fetch(topo: Topology, role: str, args: dict[str, Any]) -> dict[str, Any]:
    done = topo.run(role, sys.executable, str(ROLES), "fetch", json.dumps(args), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("{")]
    return dict(json.loads(lines[-1]))


def test_a_relay_carries_a_transfer_to_a_host_behind_a_random_port_nat(
    topo: Topology, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    relay = [PUBLIC["boot"], BOOT_PORT]
    boot = topo.popen(
        "boot",
        str(DHTSHARE),
        "bootstrap",
        "--port",
        str(BOOT_PORT),
        "--state",
        str(tmp_path / "boot"),
        "--relay",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    provider, direct_provider = Identity.generate(), Identity.generate()
    procs = [boot]
    watchers = [LineWatcher(boot)]
    try:
        watchers[0].wait_for(r"relaying for private nodes on TCP", timeout=TIMEOUT)
        seed = bytes(provider.signing_key).hex()
        procs.append(
            start(topo, "rand", "provide", {"seed": seed, "path": str(path), "relay": relay})
        )
        watchers.append(LineWatcher(procs[-1]))
        ready = first_line(watchers[-1])
        assert ready["observed"][0] == topo.public_ip("rand")  # the relay saw its router
        seed = bytes(direct_provider.signing_key).hex()
        procs.append(
            start(topo, "public", "provide", {"seed": seed, "path": str(path), "port": 7100})
        )
        watchers.append(LineWatcher(procs[-1]))
        first_line(watchers[-1])

        want = hashlib.sha256(data).hexdigest()
        common = {"content_id": ready["content_id"], "size": SIZE}
        rates: dict[str, list[float]] = {"relayed": [], "direct": []}
        for _ in range(3):
            via = {"key": provider.public.hex(), "relay": relay, "relay_key": ready["relay_key"]}
            got = fetch(topo, "keep2", {**common, **via})
            assert got["sha256"] == want
            rates["relayed"].append(SIZE / got["seconds"] / 1e6)
            direct = [PUBLIC["public"], 7100]
            got = fetch(
                topo, "keep2", {**common, "key": direct_provider.public.hex(), "direct": direct}
            )
            assert got["sha256"] == want
            rates["direct"].append(SIZE / got["seconds"] / 1e6)
        print("MB/s", {route: [round(r) for r in runs] for route, runs in rates.items()})
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        for watcher in watchers:
            watcher.join()  # it read the pipe to its end
        for proc in procs:
            if proc.stderr is not None:
                proc.stderr.close()
