"""Fixtures for the Kubernetes agent tests: kmock's emulator (with the labelled CAS
extension of tests/k8s/emulator.py) on a real HTTP port, and the fake kubelet."""

from __future__ import annotations

import pytest_asyncio
from kmock import Server

from agent_clients.backends import kubernetes as k8s_backend
from agent_clients.leadership import lease as k8s_leader
from tests.k8s.emulator import CASEmulator, FakeKubelet, calls, declare_resources

ALLOWED = k8s_backend.API_CALLS | k8s_leader.API_CALLS


@pytest_asyncio.fixture
async def emulator():
    emu = CASEmulator()
    declare_resources(emu)
    async with emu, Server(emu):
        yield emu
    # Whatever a test did, the agent never called anything its Role would not grant.
    stray = calls(emu) - ALLOWED
    assert not stray, f"the agent made API calls its Role does not grant: {sorted(stray)}"


@pytest_asyncio.fixture
async def kubelet(emulator):
    async with FakeKubelet(emulator) as fake:
        yield fake
