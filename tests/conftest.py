"""Shared pytest setup.

* `@pytest.mark.slow` tests (minutes each) run only with `RUN_SLOW=1`; `make test` runs the core without them.
* The whole suite runs with the network closed except loopback: a connection (or a DNS lookup) to any other host
  fails at once and fails the test that made it, so "the test suite makes zero network attempts" is checked, not
  assumed. Subprocesses are not covered here; the tests that start them install their own guard
  (see tests/test_reliability_runs.py).
"""
import os
import socket

import pytest


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes minutes; runs only with RUN_SLOW=1 (make test skips it)')


def pytest_collection_modifyitems(config, items):
    if os.environ.get('RUN_SLOW') == '1': return
    skip = pytest.mark.skip(reason='slow: set RUN_SLOW=1 to run')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)


_LOCAL_NAMES = {'localhost', 'localhost.localdomain', 'ip6-localhost', socket.gethostname()}


def _is_local(host) -> bool:
    if host is None: return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    return host in _LOCAL_NAMES or host.startswith('127.') or host in ('::1', '0.0.0.0', '::', '')


_ATTEMPTS: list[str] = []


def _install_guard():
    "Refuse non-loopback connections and DNS lookups in this process; record each attempt."
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def allowed(sock, address) -> bool:
        if sock.family not in (socket.AF_INET, socket.AF_INET6): return True  # unix sockets, netlink
        return _is_local(address[0] if isinstance(address, tuple) else address)

    def connect(self, address):
        if not allowed(self, address):
            _ATTEMPTS.append(f'connect {address}')
            raise OSError(101, f'network access blocked by the test suite (connect to {address})')
        return real_connect(self, address)

    def connect_ex(self, address):
        if not allowed(self, address):
            _ATTEMPTS.append(f'connect_ex {address}')
            return 101
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            _ATTEMPTS.append(f'getaddrinfo {host}')
            raise socket.gaierror(socket.EAI_NONAME, f'DNS blocked by the test suite ({host})')
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo


_install_guard()


@pytest.fixture(autouse=True)
def _no_network_attempts():
    "Fail the test that tried to reach a non-loopback host, even if its code caught the error."
    start = len(_ATTEMPTS)
    yield
    made = _ATTEMPTS[start:]
    if made: pytest.fail(f'{len(made)} network attempt(s) to non-loopback hosts: {made[:5]}', pytrace=False)
