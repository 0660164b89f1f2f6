"""Calculator and the Python sandbox: it runs ordinary code, refuses network and file escapes, times out."""

import socket
import threading
import time

import pytest

from glm5.rl.tools import (PythonSandbox, calculator_tool, get_tools, network_namespace_available, python_tool,
                           safe_eval)


def test_calculator():
    calc = calculator_tool()
    assert calc({"expression": "(12 + 7) * 3"}) == "57"
    assert calc('{"expression": "2**10 / 4"}') == "256"
    assert calc({"expression": "sqrt(16) + abs(-2)"}) == "6"
    assert calc({"expression": "1/0"}).startswith("Error")
    for bad in ["__import__('os').system('ls')", "().__class__", "9**9**9", "x + 1", "open('f')"]:
        assert calc({"expression": bad}).startswith("Error"), bad
    assert safe_eval("7 // 2") == 3
    assert calc.schema()["function"]["name"] == "calculator"
    assert [t.name for t in get_tools("calculator,python")] == ["calculator", "python"]
    with pytest.raises(ValueError):
        get_tools(["shell"])


@pytest.fixture(scope="module")
def box():
    return PythonSandbox(timeout=2.0, memory_mb=256)


def test_sandbox_runs_code(box):
    r = box.run("import math, json\nprint(math.factorial(5), json.dumps([1]))")
    assert r.ok and r.stdout.strip() == "120 [1]"
    r = box.run("open('scratch.txt', 'w').write('hi')\nprint(open('scratch.txt').read())")
    assert r.ok and r.stdout.strip() == "hi"  # its own scratch directory is writable
    assert python_tool()({"code": "print(6 * 7)"}) == "42"


@pytest.mark.parametrize("code", [
    "import socket",
    "__import__('_socket')",
    "import urllib.request",
    "import subprocess",
    "import os; os.system('echo escaped')",
    "import os; os.fork()",
    "import os; os.execv('/bin/sh', ['sh'])",
    "import ctypes",
])
def test_sandbox_refuses_network_and_processes(box, code):
    r = box.run(code)
    assert not r.ok
    assert "not allowed" in r.stderr and "escaped" not in r.stdout


@pytest.mark.parametrize("code", [
    "print(open('/etc/passwd').read())",
    "print(open('../../../etc/hostname').read())",
    "open('/tmp/glm5_sandbox_escape', 'w').write('x')",
    "import os; print(os.listdir('/root'))",
    "import os; os.remove('/tmp/whatever')",
    "import os; os.symlink('/etc/passwd', 'link'); print(open('link').read())",
    "import io; io.open('/etc/passwd').read()",
])
def test_sandbox_refuses_file_escapes(box, code):
    r = box.run(code)
    assert not r.ok and "not allowed" in r.stderr
    assert "root:" not in r.stdout


def _local_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(3)
    hits = []

    def accept():
        try:
            hits.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    return srv, th, hits


CONNECT = "s = __import__('socket').create_connection(('127.0.0.1', {port}), timeout=1); print('connected')"


def test_sandbox_has_no_route_to_local_server(box):
    """Even a server on this machine's loopback is unreachable."""
    srv, th, hits = _local_server()
    r = box.run(CONNECT.format(port=srv.getsockname()[1]))
    assert not r.ok and "connected" not in r.stdout
    th.join(4)
    srv.close()
    assert not hits


@pytest.mark.skipif(not network_namespace_available(), reason="no user/network namespaces here")
def test_network_namespace_alone_blocks_connections():
    """The namespace layer on its own (audit hooks off): the socket exists but there is no network."""
    srv, th, hits = _local_server()
    r = PythonSandbox(timeout=3.0, audit_hooks=False).run(CONNECT.format(port=srv.getsockname()[1]))
    assert r.network_isolated and not r.ok and "connected" not in r.stdout
    assert "not allowed" not in r.stderr  # refused by the kernel, not by the hook
    th.join(4)
    srv.close()
    assert not hits


def test_sandbox_timeout_and_memory(box):
    t0 = time.perf_counter()
    r = box.run("while True:\n    pass")
    assert r.timed_out and time.perf_counter() - t0 < 6
    assert "timed out" in r.text()
    r = box.run("x = bytearray(1024 ** 3)")  # 1 GiB > 256 MiB limit
    assert not r.ok and "MemoryError" in r.stderr
