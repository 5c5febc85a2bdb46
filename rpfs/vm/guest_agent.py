"""The QEMU guest agent, reached through libvirt: ping, freeze, thaw, freeze status, and running a program
in the guest (guest-exec).

libvirt owns the agent's socket, so every command goes through `libvirt_qemu.qemuAgentCommand` with a
timeout of our own: libvirt's `fsFreeze()` would wait for the agent forever unless the domain's agent
response timeout were changed for everyone (libvirt notes "custom-ga-command" in the domain's log).

Everything the guest answers is untrusted (a guest may be compromised): an answer larger than
MAX_ANSWER_BYTES is refused, it is parsed by `parse_json`, every field's type is checked, base64 is
decoded strictly, program output is cut to `max_output` bytes, and text from the guest (output, the
agent's error messages that libvirt passes on) is shown only through `shown()`, control characters
escaped. A libvirt failure becomes one of the GuestAgentError types below, its message one clean line;
the caller records a `crash` consistency with it.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass

import libvirt
import libvirt_qemu

from rpfs.errors import RpfsError
from rpfs.host.untrusted import parse_json, shown

MAX_ANSWER_BYTES = 1 << 20          # an agent answer larger than this is refused
MAX_OUTPUT_BYTES = 64 << 10         # program output kept per stream (its last bytes)
AGENT_TIMEOUT_SECONDS = 10          # a ping, a status, a thaw (libvirt adds up to 5 s for its guest-sync)
MESSAGE_CHARACTERS = 300            # a guest's text in one of our messages is cut to this
POLL_FIRST_SECONDS, POLL_MAX_SECONDS = 0.05, 1.0   # guest-exec-status backoff


# libvirt's default handler prints every error to stderr, the guest's words in it unescaped: ours are
# raised as exceptions and shown through shown(). (One handler for the process, set by whoever imports this.)
libvirt.registerErrorHandler(lambda context, error: None, None)


class GuestAgentError(RpfsError):
    """The guest agent could not do what was asked; the message is one line, safe to print."""


class AgentMissing(GuestAgentError):
    """The domain has no guest agent channel (org.qemu.guest_agent.0) in its XML."""


class AgentNotAnswering(GuestAgentError):
    """The agent is not connected, or did not answer in time (a hung or stopped qemu-ga)."""


class DomainNotRunning(GuestAgentError):
    """The domain is shut off (or gone): there is no guest to ask."""


class AgentRefused(GuestAgentError):
    """The agent answered with an error (a freeze that failed, a program it could not start)."""


class BadAgentAnswer(GuestAgentError):
    """The agent's answer was too large, not JSON, or not of the shape the command defines."""


@dataclass
class GuestExecResult:
    """A program run in the guest. exitcode is None when it was killed by a signal or timed out;
    stdout/stderr are its last max_output bytes (raw: print them through shown())."""
    exitcode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    signal: int | None = None
    truncated: bool = False          # some output was cut (by us, or by the agent's own 16 MiB limit)


def command(domain: libvirt.virDomain, execute: str, arguments: dict | None = None,
            timeout: float = AGENT_TIMEOUT_SECONDS):
    """Send one agent command and return its "return" value, parsed but not yet type-checked."""
    request = {"execute": execute, **({"arguments": arguments} if arguments is not None else {})}
    try:
        answer = libvirt_qemu.qemuAgentCommand(domain, json.dumps(request), max(1, math.ceil(timeout)), 0)
    except libvirt.libvirtError as e:
        raise _typed(e, execute) from None
    if answer is None:
        raise AgentNotAnswering(f"the guest agent gave no answer to {execute}")
    if len(answer) > MAX_ANSWER_BYTES:   # len() in characters: a byte is at least one
        raise BadAgentAnswer(f"the guest agent's answer to {execute} was larger than {MAX_ANSWER_BYTES} bytes")
    try:
        parsed = parse_json(answer)
    except ValueError:
        raise BadAgentAnswer(f"the guest agent's answer to {execute} was not JSON") from None
    if not isinstance(parsed, dict) or "return" not in parsed:
        raise BadAgentAnswer(f"the guest agent's answer to {execute} had no \"return\"")
    return parsed["return"]


def _typed(error: libvirt.libvirtError, execute: str) -> GuestAgentError:
    """libvirt's error as one of ours; its message (which may carry the guest's words) made one safe line."""
    code = error.get_error_code()
    message = shown(error.get_error_message() or str(error), MESSAGE_CHARACTERS)
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED and "agent" in message:
        return AgentMissing("the domain has no guest agent channel (org.qemu.guest_agent.0) in its XML")
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
                libvirt.VIR_ERR_OPERATION_TIMEOUT):
        return AgentNotAnswering(f"the guest agent did not answer {execute}: {message}")
    if code == libvirt.VIR_ERR_NO_DOMAIN or (code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in message):
        return DomainNotRunning(f"the domain is not running: {message}")
    return AgentRefused(f"the guest agent refused {execute}: {message}")


def _int(value, what: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 1 << 32:
        raise BadAgentAnswer(f"the guest agent's {what} was not a count")
    return value


def ping(domain: libvirt.virDomain, timeout: float = AGENT_TIMEOUT_SECONDS) -> bool:
    """True if the agent answers guest-ping within timeout; AgentMissing if the domain has none."""
    try:
        command(domain, "guest-ping", timeout=timeout)
    except (AgentNotAnswering, BadAgentAnswer, AgentRefused):
        return False
    return True


def freeze(domain: libvirt.virDomain, timeout: float) -> int:
    """Freeze the guest's filesystems (the agent runs its fsfreeze hook first); the count frozen.
    On AgentNotAnswering the freeze may still land later: the caller must keep trying to thaw."""
    return _int(command(domain, "guest-fsfreeze-freeze", timeout=timeout), "frozen filesystem count")


def thaw(domain: libvirt.virDomain, timeout: float = AGENT_TIMEOUT_SECONDS) -> int:
    """Thaw the guest's filesystems (harmless when none is frozen); the count thawed."""
    return _int(command(domain, "guest-fsfreeze-thaw", timeout=timeout), "thawed filesystem count")


def frozen(domain: libvirt.virDomain, timeout: float = AGENT_TIMEOUT_SECONDS) -> bool:
    """Whether the agent says the guest is frozen (guest-fsfreeze-status)."""
    status = command(domain, "guest-fsfreeze-status", timeout=timeout)
    if status not in ("frozen", "thawed"):
        raise BadAgentAnswer("the guest agent's freeze status was neither frozen nor thawed")
    return status == "frozen"


def run(domain: libvirt.virDomain, path: str, args: list[str], timeout_seconds: float,
        max_output: int = MAX_OUTPUT_BYTES) -> GuestExecResult:
    """Run a program in the guest (guest-exec, output captured) and wait for it at most timeout_seconds.

    The agent has no command to stop a program it started: one that outlives the timeout goes on in the
    guest, and the result says timed_out (its output, which the agent gives only at the exit, is lost).
    """
    deadline = time.monotonic() + timeout_seconds
    started = command(domain, "guest-exec", {"path": path, "arg": list(args), "capture-output": True},
                      timeout=min(AGENT_TIMEOUT_SECONDS, timeout_seconds))
    if not isinstance(started, dict):
        raise BadAgentAnswer("the guest agent's answer to guest-exec was not an object")
    pid = _int(started.get("pid"), "process id", minimum=1)
    pause = POLL_FIRST_SECONDS
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return GuestExecResult(exitcode=None, stdout=b"", stderr=b"", timed_out=True)
        status = command(domain, "guest-exec-status", {"pid": pid}, timeout=min(AGENT_TIMEOUT_SECONDS, remaining))
        if not isinstance(status, dict) or not isinstance(status.get("exited"), bool):
            raise BadAgentAnswer("the guest agent's answer to guest-exec-status had no exited flag")
        if status["exited"]:
            return _exited(status, max_output)
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, POLL_MAX_SECONDS)


def _exited(status: dict, max_output: int) -> GuestExecResult:
    exitcode = status.get("exitcode")
    signal = status.get("signal")
    if exitcode is not None:
        exitcode = _int(exitcode, "exit code", minimum=-(1 << 31))
    if signal is not None:
        signal = _int(signal, "signal number")
    truncated = False
    streams = []
    for name in ("out", "err"):
        data = status.get(f"{name}-data", "")
        if not isinstance(data, str):
            raise BadAgentAnswer(f"the guest agent's {name}-data was not a string")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadAgentAnswer(f"the guest agent's {name}-data was not base64") from None
        cut = status.get(f"{name}-truncated", False)
        if not isinstance(cut, bool):
            raise BadAgentAnswer(f"the guest agent's {name}-truncated was not true or false")
        truncated |= cut or len(raw) > max_output
        streams.append(raw[-max_output:] if max_output > 0 else b"")
    return GuestExecResult(exitcode=exitcode, stdout=streams[0], stderr=streams[1], timed_out=False,
                           signal=signal, truncated=truncated)
