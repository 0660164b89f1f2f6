"""Tools for multi-turn rollouts: a calculator and a sandboxed Python interpreter.

A :class:`Tool` has an OpenAI function schema (rendered into GLM-5's ``# Tools`` system block by the chat
template) and is called with the parsed ``arguments`` dict; it returns the text that goes into
``<tool_response>...</tool_response>``. Tools never raise: errors come back as text for the model to read.

``calculator``: arithmetic only, evaluated on the AST (numbers, + − × ÷ // % **, parentheses, abs/round/min/
max/sqrt); exponents and magnitudes are bounded so it cannot be used to burn CPU.

``python``: runs code in a separate interpreter process, layered:

1. **no network**: the child runs in a fresh network namespace (``unshare -n``; ``-rn`` when not root) when
   the kernel allows it, so there is no interface to reach anything; independently of that,
2. **audit hooks** (PEP 578, cannot be removed from Python code) refuse socket creation/connection/DNS,
   process creation (fork/exec/spawn/system/subprocess), ctypes, signals to other processes, and any file
   open/write/rename/delete outside the sandbox's private temporary directory (reading the Python standard
   library is allowed, so imports work); importing socket/ssl/subprocess/multiprocessing/ctypes fails;
3. **resource limits**: address space (``memory_mb``), CPU seconds, file size, open files;
4. **wall-clock timeout**: the whole process group is killed after ``timeout`` seconds;
5. isolated mode (``-I``: no user site-packages, no PYTHON* variables), an empty environment, the temporary
   directory as working directory (deleted afterwards), stdout/stderr truncated to ``max_output``.

It is a guard against accidents and casual misuse by a policy model, not a security boundary against a
determined attacker with kernel exploits.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Tool", "SandboxResult", "PythonSandbox", "network_namespace_available", "safe_eval", "calculator_tool", "python_tool", "get_tools",
           "TOOL_FACTORIES"]


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    fn: Callable[[dict], str]

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments: dict | str | None) -> str:
        try:
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
            return str(self.fn(arguments or {}))
        except Exception as e:  # a tool never raises into the rollout
            return f"Error: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------- calculator
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UN = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt}
_MAX_MAG = 1e18


def safe_eval(expr: str) -> int | float:
    """Evaluate an arithmetic expression without ``eval``; raises ValueError on anything else."""
    if len(expr) > 500:
        raise ValueError("expression too long")
    tree = ast.parse(expr.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise ValueError("exponent too large")
            v = _BIN[type(node.op)](a, b)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UN:
            v = _UN[type(node.op)](ev(node.operand))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
              and not node.keywords and len(node.args) <= 8):
            v = _FUNCS[node.func.id](*[ev(a) for a in node.args])
        else:
            raise ValueError(f"unsupported expression element: {type(node).__name__}")
        if isinstance(v, complex) or abs(v) > _MAX_MAG:
            raise ValueError("result out of range")
        return v

    v = ev(tree)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return int(v)
    return v


def calculator_tool() -> Tool:
    def run(args: dict) -> str:
        expr = str(args.get("expression", ""))
        try:
            return str(safe_eval(expr))
        except ZeroDivisionError:
            return "Error: division by zero"
        except (ValueError, SyntaxError, TypeError, OverflowError) as e:
            return f"Error: {e}"

    return Tool("calculator", "Evaluate an arithmetic expression and return the number.",
                {"type": "object", "properties": {"expression": {"type": "string",
                                                                 "description": "e.g. (12 + 7) * 3"}},
                 "required": ["expression"]}, run)


# ------------------------------------------------------------------------------------------ sandbox
_BOOTSTRAP = r'''
import sys, os
_code = sys.stdin.read()
_root = os.path.realpath(os.getcwd())
_read_ok = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix,
                                               os.path.dirname(os.__file__)} if p)
_blocked_mods = {"socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess", "multiprocessing",
                 "_multiprocessing", "ctypes", "_ctypes", "pty", "asyncio", "selectors", "select", "mmap",
                 "resource", "signal", "urllib.request", "http.client", "ftplib", "smtplib", "telnetlib"}
_fs_events = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.link", "os.symlink",
              "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chdir",
              "os.listdir", "os.scandir", "os.chflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod"}
_deny = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
         "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.startfile",
         "sys._current_frames", "os.putenv", "os.unsetenv", "webbrowser.open", "winreg.OpenKey"}

def _inside(p, roots):
    if isinstance(p, int):
        return p in (0, 1, 2)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    rp = os.path.realpath(os.path.join(_root, os.fspath(p)))
    return any(rp == r or rp.startswith(r + os.sep) for r in roots)

def _hook(event, args):
    if event.startswith("socket.") or event in _deny:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and (args[0] in _blocked_mods or args[0].split(".")[0] in _blocked_mods):
        raise ImportError(f"sandbox: import of {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        if path is None:
            return
        writing = bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)) or (
            isinstance(mode, str) and any(c in mode for c in "wax+"))
        if not _inside(path, (_root,) if writing else (_root,) + _read_ok):
            raise PermissionError(f"sandbox: access to {path!r} is not allowed")
    elif event in _fs_events:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a, (_root,) if event not in ("os.listdir", "os.scandir") else (_root,) + _read_ok):
                raise PermissionError(f"sandbox: {event} on {a!r} is not allowed")

sys.addaudithook(_hook)
del _hook
_g = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_code, "<sandbox>", "exec"), _g)
'''


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool = False
    network_isolated: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def text(self, max_chars: int = 2000) -> str:
        if self.timed_out:
            out = self.stdout + "\nError: timed out"
        elif self.returncode != 0:
            tail = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else [f"exit code {self.returncode}"]
            out = self.stdout + ("\n" if self.stdout else "") + "Error: " + tail[0]
        else:
            out = self.stdout
        out = out.strip()
        return out if len(out) <= max_chars else out[:max_chars] + "...[truncated]"


_NETNS_CMD: list[str] | None = None


def network_namespace_available() -> bool:
    return bool(_netns_prefix())


def _netns_prefix() -> list[str]:
    """``unshare -n`` (root) or ``unshare -rn`` when it works here, else [] (audit hooks still block sockets)."""
    global _NETNS_CMD
    if _NETNS_CMD is None:
        _NETNS_CMD = []
        exe = shutil.which("unshare")
        if exe:
            for cmd in ([exe, "-n"], [exe, "-rn"]) if os.geteuid() == 0 else ([exe, "-rn"],):
                try:
                    r = subprocess.run(cmd + ["true"], capture_output=True, timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if r.returncode == 0:
                    _NETNS_CMD = cmd
                    break
    return list(_NETNS_CMD)


class PythonSandbox:
    """Run untrusted Python in a limited child process (see module docstring)."""

    def __init__(self, timeout: float = 5.0, memory_mb: int = 512, cpu_seconds: int | None = None,
                 max_output: int = 10_000, file_size_mb: int = 4, network_namespace: bool = True,
                 audit_hooks: bool = True):
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.cpu_seconds = cpu_seconds if cpu_seconds is not None else max(1, int(math.ceil(timeout)) + 1)
        self.max_output = max_output
        self.file_size_mb = file_size_mb
        self.network_namespace = network_namespace
        self.audit_hooks = audit_hooks  # False only to test the other layers on their own

    def _limits(self):
        mem = self.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds + 1))
        fs = self.file_size_mb << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fs, fs))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def run(self, code: str) -> SandboxResult:
        prefix = _netns_prefix() if self.network_namespace else []
        work = tempfile.mkdtemp(prefix="glm5-sandbox-")
        boot = _BOOTSTRAP if self.audit_hooks else _BOOTSTRAP.replace("sys.addaudithook(_hook)", "pass")
        cmd = prefix + [sys.executable, "-I", "-S", "-B", "-c", boot]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work, "PYTHONIOENCODING": "utf-8"}
        try:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, preexec_fn=self._limits,
                                    close_fds=True)
            timed_out = False
            try:
                out, err = proc.communicate(code.encode("utf-8"), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                out, err = proc.communicate()
            rc = proc.returncode
            if rc is not None and rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL) and not timed_out:
                timed_out = -rc == signal.SIGXCPU
        finally:
            shutil.rmtree(work, ignore_errors=True)
        dec = lambda b: b[: self.max_output].decode("utf-8", errors="replace")  # noqa: E731
        return SandboxResult(dec(out), dec(err), rc, timed_out, network_isolated=bool(prefix))


def python_tool(timeout: float = 5.0, memory_mb: int = 512) -> Tool:
    box = PythonSandbox(timeout=timeout, memory_mb=memory_mb)
    return Tool("python", "Run Python 3 code in a sandbox (no network, no files outside a scratch directory) and "
                          "return what it prints.",
                {"type": "object", "properties": {"code": {"type": "string", "description": "Python source; use print()"}},
                 "required": ["code"]},
                lambda args: box.run(str(args.get("code", ""))).text())


TOOL_FACTORIES: dict[str, Callable[[], Tool]] = {"calculator": calculator_tool, "python": python_tool}


def get_tools(names) -> list[Tool]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    out = []
    for n in names or []:
        if n not in TOOL_FACTORIES:
            raise ValueError(f"unknown tool {n!r}; choose from {', '.join(TOOL_FACTORIES)}")
        out.append(TOOL_FACTORIES[n]())
    return out
