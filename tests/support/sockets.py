"""Read a socket option on the *server's* side of a TCP connection held by another process.

``server_socket_option(pid, client, …)`` finds the connection that ``client`` (a connected
socket in this process) has with process ``pid``: the kernel's TCP table
(``/proc/net/tcp``, ``tcp6``) names the inode of the server's end, ``/proc/PID/fd`` names
the descriptor that holds it, and ``pidfd_getfd(2)`` (Linux 5.6) copies that descriptor
into this process, where ``getsockopt`` reads the option the server really has.
:func:`client_tcp_nodelay` does the same for the connections a process opened to a port
(an MQTT client's socket to its broker). Nothing is inferred from timing.

``pidfd_getfd`` needs ptrace rights over ``pid`` (a child of the test process has them
unless a security module says otherwise); :func:`pidfd_getfd_works` says whether it
works here, so tests can skip cleanly where it does not.
"""

from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path

SYS_PIDFD_GETFD = 438  # the same number on every architecture (syscalls ≥ 424 are unified)


def _addr_hex(host: str, port: int, family: int) -> str:
    packed = socket.inet_pton(family, host)
    if family == socket.AF_INET:
        host_hex = packed[::-1].hex().upper()  # one little-endian 32-bit word
    else:  # four little-endian 32-bit words
        host_hex = "".join(packed[i : i + 4][::-1].hex().upper() for i in range(0, 16, 4))
    return f"{host_hex}:{port:04X}"


def _inode_of(local: str, remote: str) -> int:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[1] == local and f[2] == remote:
                return int(f[9])
    raise LookupError(f"no TCP connection {local} ↔ {remote} in /proc/net/tcp*")


def _fd_of(pid: int, inode: int) -> int:
    want = f"socket:[{inode}]"
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) == want:
                return int(entry.name)
        except OSError:
            continue  # closed meanwhile
    raise LookupError(f"process {pid} holds no descriptor for socket inode {inode}")


def _copy_fd(pid: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copied = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
        if copied < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return copied
    finally:
        os.close(pidfd)


def _option(pid: int, inode: int, level: int, option: int) -> int:
    copied = _copy_fd(pid, _fd_of(pid, inode))
    sock = socket.socket(fileno=copied)  # our copy; closing it leaves the owner's open
    try:
        return int(sock.getsockopt(level, option))
    finally:
        sock.close()


def server_socket_option(pid: int, client: socket.socket, level: int, option: int) -> int:
    """``getsockopt(level, option)`` on the socket process ``pid`` accepted for ``client``."""
    family = client.family
    c_host, c_port = client.getsockname()[:2]
    s_host, s_port = client.getpeername()[:2]
    inode = _inode_of(_addr_hex(s_host, s_port, family), _addr_hex(c_host, c_port, family))
    return _option(pid, inode, level, option)


def server_tcp_nodelay(pid: int, client: socket.socket) -> bool:
    """Whether the server's end of ``client``'s connection has ``TCP_NODELAY`` set."""
    return bool(server_socket_option(pid, client, socket.IPPROTO_TCP, socket.TCP_NODELAY))


def client_tcp_nodelay(pid: int, remote_port: int) -> dict[int, bool]:
    """``TCP_NODELAY`` of every connection process ``pid`` opened to ``remote_port``
    (its local port → the option), e.g. an MQTT client's socket to the broker."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            local_port = int(f[1].rsplit(":", 1)[1], 16)
            if int(f[2].rsplit(":", 1)[1], 16) == remote_port and f[3] == "01":  # ESTABLISHED
                inodes[local_port] = int(f[9])
    found = {}
    for local_port, inode in inodes.items():
        try:
            found[local_port] = bool(_option(pid, inode, socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except LookupError:
            continue  # another process's connection to the same port
    return found


def pidfd_getfd_works() -> bool:
    """Whether this process may copy a child's descriptor (kernel ≥ 5.6, ptrace allowed)."""
    import subprocess
    import sys

    if not hasattr(os, "pidfd_open"):
        return False
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        os.close(_copy_fd(child.pid, 0))
        return True
    except OSError:
        return False
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
