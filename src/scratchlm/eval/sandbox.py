"""Run untrusted, model-written Python in a locked-down subprocess, never in this process.

A generated completion may loop forever, allocate without bound, fork, delete files or
open sockets. Each program runs in a fresh ``python -I -S`` (no site packages, no environment
variables read) in a throw-away directory, with an almost empty environment, and before
the program's first line the child locks itself down:

- **time**: a wall-clock limit enforced from outside (the whole process group is killed)
  and a CPU-seconds limit (``RLIMIT_CPU``) from inside;
- **memory**: ``RLIMIT_AS`` caps the address space: a runaway allocation is a MemoryError;
- **files**: ``RLIMIT_FSIZE`` caps the size of any file written; the working directory
  (and HOME, TMPDIR) is a temporary directory deleted afterwards;
- **no new processes, no network**: a seccomp filter (Linux) makes fork, vfork, clone,
  execve, socket, connect and ptrace fail with EPERM for the rest of the process's life;
  where seccomp is not available, ``RLIMIT_NPROC`` and Python-level guards stand in.

Passing means the program ran to its end: the child writes a one-time token after the
program returns, so ``os._exit(0)`` or ``sys.exit(0)`` midway is not a pass.

>>> run_program("assert sum(range(4)) == 6").passed
True
>>> result = run_program("import os; os.fork()")
>>> result.passed, result.status
(False, 'failed')
>>> run_program("while True: pass", timeout=1).status
'timed out'
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs inside the child, before the program: limits, seccomp, guards; then the program.
_BOOT = r'''
import ctypes, io, os, platform, resource, struct, sys
token, memory, cpu, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
del sys.argv[1:]
program = sys.stdin.read()
sys.stdin.close()
os.close(0)
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass

def seccomp():
    # Blocked system calls per architecture (numbers from the kernel's syscall tables).
    tables = {"x86_64": (0xC000003E, [41, 42, 56, 57, 58, 59, 101, 322, 435]),
              "aarch64": (0xC00000B7, [198, 203, 220, 221, 117, 281, 435])}
    if sys.platform != "linux" or platform.machine() not in tables:
        return False
    arch, blocked = tables[platform.machine()]
    ins = lambda code, jt, jf, k: struct.pack("HBBI", code, jt, jf, k)
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    ALLOW, DENY, KILL = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # DENY: fail with EPERM
    prog = [ins(LD, 0, 0, 4), ins(JEQ, 1, 0, arch), ins(RET, 0, 0, KILL), ins(LD, 0, 0, 0)]
    checks = [(JGE, 0x40000000)] if arch == 0xC000003E else []  # the x32 ABI: deny it whole
    checks += [(JEQ, nr) for nr in blocked]
    for i, (op, k) in enumerate(checks):
        prog.append(ins(op, len(checks) - i, 0, k))  # match: jump over the rest and ALLOW to DENY
    prog += [ins(RET, 0, 0, ALLOW), ins(RET, 0, 0, DENY)]
    code = b"".join(prog)
    buffer = ctypes.create_string_buffer(code, len(code))
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Fprog(len(prog), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER

locked = False
try:
    locked = seccomp()
except Exception:
    pass
if not locked:
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass

def refused(*args, **kwargs):
    raise PermissionError("not allowed in the sandbox")
import shutil, socket, subprocess
for module, names in ((os, "fork forkpty system popen execv execve execvp execvpe execl execle execlp "
                           "spawnv spawnve spawnl spawnle posix_spawn posix_spawnp kill killpg "
                           "putenv unsetenv chroot setuid"),
                      (subprocess, "Popen run call check_call check_output getoutput getstatusoutput"),
                      (socket, "socket create_connection socketpair"), (shutil, "rmtree move chown")):
    for name in names.split():
        if hasattr(module, name):
            setattr(module, name, refused)
sys.stdout = sys.stderr = io.StringIO()
try:
    exec(compile(program, "<program>", "exec"), {"__name__": "__main__"})
except BaseException as e:
    os.write(2, f"{type(e).__name__}: {e}"[:300].encode("utf-8", "replace"))
    os._exit(1)
os.write(1, token.encode())
os._exit(0)
'''


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed", "failed" or "timed out"
    detail: str = ""


def run_program(program: str, *, timeout: float = 5.0, memory_mb: int = 1024,
                max_file_mb: int = 16) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox; passed when it ran to its end without error."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="scratchlm-sandbox-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-I", "-S", "-c", _BOOT, token, str(memory_mb << 20),
                str(max(1, int(timeout + 1))), str(max_file_mb << 20)]
        process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=workdir, env=env, start_new_session=True)
        try:
            out, err = process.communicate(program.encode("utf-8"), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            return SandboxResult(False, "timed out", f"ran past {timeout:g} s")
        finally:
            _kill_group(process)  # anything it left behind in its group
    if process.returncode == 0 and out.decode(errors="replace") == token:
        return SandboxResult(True, "passed")
    detail = err.decode(errors="replace").strip()
    if process.returncode and process.returncode < 0:
        detail = detail or f"killed by signal {signal.Signals(-process.returncode).name}"
        if -process.returncode == signal.SIGXCPU:
            return SandboxResult(False, "timed out", "CPU time limit")
    return SandboxResult(False, "failed", detail or f"exit code {process.returncode}")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
