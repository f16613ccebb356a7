"""Shared fixtures: a background loop, fake upstreams and a real Nexus on loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx2
import pytest

from nexus.config import Settings

from .fakes import FakeUpstream
from .harness import LoopThread, NexusServer

F = TypeVar("F", bound=FakeUpstream)


@pytest.fixture(scope="session", autouse=True)
def own_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every Nexus the tests start (in process or as ``nexus serve``) keeps its spend under a
    temporary $XDG_STATE_HOME, never in the user's ~/.local/state/nexus."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))
    yield
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def start_fake(loop_thread: LoopThread) -> Iterator[Callable[[F], F]]:
    """Start a fake upstream on a free loopback port; stopped after the test."""
    started: list[FakeUpstream] = []

    def start(fake: F) -> F:
        loop_thread.run(fake.start())
        started.append(fake)
        return fake

    yield start
    for fake in started:
        loop_thread.run(fake.stop())


@pytest.fixture
def start_nexus(loop_thread: LoopThread) -> Iterator[Callable[[Settings], NexusServer]]:
    """Start the real app under uvicorn on a free loopback port; shut down after the test."""
    servers: list[NexusServer] = []

    def start(settings: Settings) -> NexusServer:
        server = NexusServer(loop_thread, settings).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=30) as http:
        yield http


@pytest.fixture
def kill(loop_thread: LoopThread) -> Iterator[Callable[[FakeUpstream], None]]:
    """Stop a fake after Nexus learnt its models; its port is held so connections are refused."""
    held: list[socket.socket] = []

    def kill(fake: FakeUpstream) -> None:
        loop_thread.run(fake.stop())
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # taken meanwhile: still not our fake
            sock.bind(("127.0.0.1", fake.port))
        held.append(sock)

    yield kill
    for sock in held:
        sock.close()
