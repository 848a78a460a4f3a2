"""A node behind a router that holds no relay says so in its log, once (after its keeper
looked for one for a maintenance interval): nobody outside its network can download from
it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from support.nodes import NodeCluster

from dhtshare.reach.autonat import ReachState, Verdict


async def test_a_private_node_without_a_relay_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with NodeCluster.running(tmp_path) as cluster:
        node = await cluster.node("home")  # its only contact, the bootstrap node, relays not
        node.reachability.policy.state = ReachState(Verdict.PRIVATE)
        node._reach_changed(node.reachability.state)  # the keeper starts, finds no relay
        with caplog.at_level(logging.WARNING, logger="dhtshare.node.service"):
            await node.maintain()  # too soon: the keeper has not looked for an interval yet
            assert not [r for r in caplog.records if "no relay" in r.message]
            node._keeping_since -= node.config.maintenance_interval
            await node.maintain()
            await node.maintain()
        warnings = [r for r in caplog.records if "no relay holds a reservation" in r.message]
        assert len(warnings) == 1
        assert node.relays == []
