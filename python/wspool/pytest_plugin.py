"""pytest plugin for wspool: the ``mock_server`` fixture.

Installed with wspool and loaded by pytest automatically (entry point ``wspool`` in the
``pytest11`` group); ``pytest -p wspool.pytest_plugin`` loads it explicitly, and
``-p no:wspool`` turns it off.

Importing this module is cheap and needs nothing but pytest: :mod:`wspool.testing` and the
``websockets`` package it needs are imported only when a test asks for the fixture, so having
wspool installed never breaks an unrelated pytest run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from wspool.testing import MockServer

__all__ = ["mock_server"]


@pytest.fixture
def mock_server() -> Iterator[Callable[..., MockServer]]:
    """Make started :class:`wspool.testing.MockServer` instances; stop them all at teardown.

    The fixture is a factory: call it with :class:`~wspool.testing.MockServer`'s arguments
    (``messages`` positionally or by name, the rest by name). It returns the server already
    listening on a free loopback port; read its address from ``server.url``. Any number of
    servers can be made in one test.

    Example::

        def test_consumer_reads_everything(mock_server):
            server = mock_server(count=100, rate=None)
            got = my_consumer(server.url)
            assert [json.loads(m)["seq"] for m in got] == list(range(100))
            assert server.wait_for(lambda s: s.close_codes == [1000])

        def test_subscribe_message_is_sent(mock_server):
            server = mock_server(['{"ok": true}'], start_delay=0.1)
            my_consumer(server.url, subscribe='{"op": "subscribe"}')
            assert server.received == ['{"op": "subscribe"}']

    Raises (when called):
        TypeError, ValueError: as the ``MockServer`` constructor does.
        RuntimeError: the server could not start.
        ImportError: the ``websockets`` package (>= 13) is not installed.
    """
    from wspool.testing import MockServer

    servers: list[MockServer] = []

    def factory(*args: Any, **kwargs: Any) -> MockServer:
        server = MockServer(*args, **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield factory
    finally:
        errors = []
        for server in reversed(servers):
            try:
                server.stop()
            except Exception as exc:  # stop the others, then report
                errors.append(exc)
        if errors:
            raise errors[0]
