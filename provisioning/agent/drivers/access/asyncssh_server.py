"""The agent's own SSH server for one reservation, for a node where OpenSSH's sshd cannot run (servers.py):

    python -m provisioning.agent.drivers.access.asyncssh_server CONFIG

CONFIG is the JSON the agent wrote (``servers.asyncssh_config``). The server lets in ``user`` only, with a
key of ``authorized_keys`` only (read again at each authentication, so the agent's updates of the keys
take effect at the next login), and runs exec and shell sessions (on a terminal when the client asks for
one) and SFTP, in ``home``, with ``environment``. No passwords, no forwarding of agents, X11 or ports.

Started by a root agent (``uid`` given), it reads its host key and binds its port as root, then becomes
the account (no supplementary groups, the account's gid, its uid) before it accepts a connection: it and
every session run as the account, and the host key stays root's. It is not started as the account
because the agent's Python may lie where the account cannot reach (under /root); everything it needs
is imported before it drops root.
"""

import asyncio
import fcntl
import json
import logging
import os
import sys
import termios
from pathlib import Path
from typing import Any

import asyncssh

logger = logging.getLogger("neocloud-access")


class _Server(asyncssh.SSHServer):
    def __init__(self, user: str, authorized_keys: str) -> None:
        self._user = user
        self._authorized_keys = authorized_keys
        self._connection: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connection = conn

    def begin_auth(self, username: str) -> bool:
        """Every login needs a key, and only the account's keys are trusted, as the file says now."""
        keys = None
        if username == self._user:
            try:
                keys = asyncssh.read_authorized_keys(self._authorized_keys)
            except (OSError, asyncssh.KeyImportError):
                logger.exception("cannot read %s", self._authorized_keys)
        if self._connection is not None:
            self._connection.set_authorized_keys(keys)
        return True

    def public_key_auth_supported(self) -> bool:
        return True


def _exit_code(returncode: int) -> int:
    """A shell's way of saying a program was killed by a signal: 128 and the signal."""
    return 128 - returncode if returncode < 0 else returncode


def _take_terminal() -> None:
    """In the session's child, after setsid: its terminal becomes the session's controlling terminal
    (job control, ^C)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Sessions:
    def __init__(self, config: dict[str, Any]) -> None:
        self._shell = config["shell"]
        self._home = config["home"]
        self._environment = {
            "LANG": "C.UTF-8",
            **config["environment"],
            "HOME": config["home"],
            "USER": config["user"],
            "LOGNAME": config["user"],
            "SHELL": config["shell"],
        }

    async def __call__(self, process: asyncssh.SSHServerProcess) -> None:
        if process.subsystem is not None:
            process.stderr.write(f"no subsystem {process.subsystem!r} here\n".encode())
            process.exit(1)
            return
        argv = [self._shell, "-l"] if process.command is None else [self._shell, "-c", process.command]
        terminal = process.get_terminal_type()
        try:
            if terminal is None:
                returncode = await self._piped(process, argv)
            else:
                returncode = await self._on_terminal(process, argv, {**self._environment, "TERM": terminal})
        except OSError as exc:
            process.stderr.write(f"cannot start {argv[0]}: {exc.strerror or exc}\n".encode())
            returncode = 127
        process.exit(_exit_code(returncode))

    async def _piped(self, process: asyncssh.SSHServerProcess, argv: list[str]) -> int:
        child = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self._home,
            env=self._environment,
            start_new_session=True,
        )
        process.set_redirect_pid(child.pid)
        # No EOF to the client when one of the two ends: it would close the channel under the other.
        await process.redirect(stdin=child.stdin, stdout=child.stdout, stderr=child.stderr, send_eof=False)
        returncode = await child.wait()
        await process.stdout.drain()  # until what it wrote has gone out, not only until it exited
        await process.stderr.drain()
        return returncode

    async def _on_terminal(self, process: asyncssh.SSHServerProcess, argv: list[str], environment: dict) -> int:
        leader, follower = os.openpty()
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdin=follower,
                stdout=follower,
                stderr=follower,
                cwd=self._home,
                env=environment,
                start_new_session=True,
                preexec_fn=_take_terminal,
            )
        except OSError:
            os.close(leader)
            raise
        finally:
            os.close(follower)
        process.set_redirect_pid(child.pid)  # window size changes and ^C reach it
        await process.redirect(stdin=leader, stdout=os.dup(leader))
        returncode = await child.wait()
        await process.stdout.drain()
        return returncode


def _become(config: dict[str, Any]) -> None:
    os.setgroups([])
    os.setgid(config["gid"])
    os.setuid(config["uid"])


async def serve(config: dict[str, Any]) -> None:
    host_key = asyncssh.read_private_key(config["host_key"])
    server = await asyncssh.create_server(
        lambda: _Server(config["user"], config["authorized_keys"]),
        config["listen"],
        config["port"],
        server_host_keys=[host_key],
        process_factory=Sessions(config),
        sftp_factory=True,
        encoding=None,
        line_editor=False,  # the session's own terminal edits lines
        agent_forwarding=False,
        x11_forwarding=False,
    )
    if config["uid"] is not None:
        _become(config)
    os.chdir(config["home"])  # where SFTP's relative paths start
    logger.info("listening on %s port %s for %s", config["listen"], config["port"], config["user"])
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        print("usage: python -m provisioning.agent.drivers.access.asyncssh_server CONFIG", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(json.loads(Path(arguments[0]).read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
