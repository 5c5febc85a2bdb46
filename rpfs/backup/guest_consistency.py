"""The moment a running VM's backup is taken, inside its guest, in Azure's order: guest pre-script ->
guest freeze (watched: rpfs/vm/guest_watchdog.py) -> snapshot -> thaw at once -> guest post-script.

The recovery point's consistency, from the guest's side:
  application   guest pre- and post-scripts configured and succeeded, the guest frozen for the snapshot
  file-system   the guest frozen for the snapshot; no scripts, or one failed with continue_on_failure
  crash         not frozen, with the reason: no agent in the domain's XML, the agent not answering in
                time, the freeze failed or froze nothing, the freeze window ran out, the domain not running
Scripts are paths inside the guest, run by its agent (guest-exec) with their timeout; what they print is
the guest's, untrusted: kept short and escaped (rpfs/vm/guest_agent.py). A pre-script that fails without
continue_on_failure stops the backup, after the post-script ran, as the host's scripts do
(rpfs/backup/consistency.py).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, TypeVar

import libvirt

from rpfs.backup.quiesce import ConsistencyConfig, Script
from rpfs.errors import RpfsError
from rpfs.vm import guest_agent
from rpfs.host.untrusted import shown
from rpfs.vm.guest_agent import AgentMissing, DomainNotRunning, GuestAgentError
from rpfs.vm.guest_watchdog import GuestFreeze, watched_freeze

T = TypeVar("T")
RECORDED_OUTPUT = 1024      # characters of each stream's end kept on the recovery point
STATES = {libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
          libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down", libvirt.VIR_DOMAIN_CRASHED: "crashed",
          libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended by the guest", libvirt.VIR_DOMAIN_BLOCKED: "blocked"}


@dataclass
class GuestScriptResult:
    script: str
    ok: bool
    attempts: int
    exit_code: int | None
    seconds: float
    timed_out: bool = False
    message: str = ""           # why it failed, one safe line
    stdout: str = ""            # the end of what it printed, escaped
    stderr: str = ""


@dataclass
class GuestRecord:
    """What happened inside the guest, kept on the recovery point."""
    consistency: str = "crash"                 # application | file-system | crash
    reason: str = ""                           # why not application (one line)
    frozen_seconds: float = 0.0                # from the freeze sent to the thaw answered
    filesystems_frozen: int = 0
    thawed: bool | None = True                 # None: not confirmed; the watchdog goes on trying
    watchdog_stepped_in: bool = False
    pre: GuestScriptResult | None = None
    post: GuestScriptResult | None = None
    problems: list[str] = field(default_factory=list)   # the thaw's or a script's trouble, one line each

    def record(self) -> dict:
        return asdict(self)


def guest_consistent(domain: libvirt.virDomain, config: ConsistencyConfig | None,
                     take_snapshot: Callable[[], T],
                     agent_timeout: float = guest_agent.AGENT_TIMEOUT_SECONDS) -> tuple[T, GuestRecord]:
    """Run the guest's pre-script, freeze the guest, take_snapshot(), thaw, run the post-script.

    take_snapshot runs once, frozen or not (not frozen: crash, with the reason); if it raises, the guest
    is thawed and the post-script run first. RpfsError (one line) when the pre-script fails without
    continue_on_failure: no snapshot was taken.
    """
    config = config or ConsistencyConfig()
    record = GuestRecord()
    agent_ok = _agent_answers(domain, agent_timeout, record)
    scripts_ok = config.guest_pre is not None and config.guest_post is not None
    why_not_application = "" if scripts_ok else "no guest pre- and post-script configured"
    if config.guest_pre is not None:
        record.pre = run_guest_script(domain, config.guest_pre, "" if agent_ok else record.reason,
                                      agent_timeout)
        if not record.pre.ok:
            scripts_ok = False
            why_not_application = f"the guest pre-script failed ({record.pre.message})"
            if not config.guest_pre.continue_on_failure:
                _post(domain, config, record, agent_ok, agent_timeout)   # the application resumes
                raise RpfsError(f"guest pre-script {shown(config.guest_pre.path, 200)} failed"
                                f" ({record.pre.message}); no backup was taken"
                                " (set continue_on_failure to back up anyway)")
    if not agent_ok:
        try:
            snapshot = take_snapshot()
        finally:
            _post(domain, config, record, agent_ok, agent_timeout)
        return snapshot, record
    window = None
    try:
        with watched_freeze(domain, config.guest_freeze_max_seconds, agent_timeout=agent_timeout) as window:
            snapshot = take_snapshot()
    finally:
        if window is not None:
            _window(window, record)
        _post(domain, config, record, agent_ok, agent_timeout)
    if record.post is not None and not record.post.ok:
        scripts_ok = False
        why_not_application = why_not_application or f"the guest post-script failed ({record.post.message})"
    if not window.frozen or window.ran_out:
        record.consistency, record.reason = "crash", window.reason or "the guest was not frozen"
    elif scripts_ok:
        record.consistency, record.reason = "application", ""
    else:
        record.consistency, record.reason = "file-system", why_not_application
    return snapshot, record


def _agent_answers(domain: libvirt.virDomain, timeout: float, record: GuestRecord) -> bool:
    """Whether the agent answers; if not, record.reason says why (the point will be crash)."""
    try:
        state = domain.state()[0]
        if state != libvirt.VIR_DOMAIN_RUNNING:
            record.reason = f"the domain is not running ({STATES.get(state, f'state {state}')})"
            return False
        if guest_agent.ping(domain, timeout):
            return True
        record.reason = f"the guest agent did not answer within {timeout:g} s"
    except AgentMissing:
        record.reason = "the domain has no guest agent (no org.qemu.guest_agent.0 channel in its XML)"
    except DomainNotRunning:
        record.reason = "the domain is not running"
    except libvirt.libvirtError as e:
        record.reason = f"libvirt: {shown(e.get_error_message() or str(e), 300)}"
    return False


def _window(window: GuestFreeze, record: GuestRecord) -> None:
    record.frozen_seconds = window.seconds
    record.filesystems_frozen = window.filesystems
    record.thawed = window.thawed
    record.watchdog_stepped_in = window.watchdog_stepped_in
    if window.thaw_error:
        record.problems.append(f"thaw: {window.thaw_error}")
    if window.thawed is None:
        record.problems.append("the guest's thaw is not confirmed: its watchdog goes on trying")


def _post(domain: libvirt.virDomain, config: ConsistencyConfig, record: GuestRecord, agent_ok: bool,
          timeout: float) -> None:
    if config.guest_post is not None and record.post is None:
        record.post = run_guest_script(domain, config.guest_post, "" if agent_ok else record.reason, timeout)


def run_guest_script(domain: libvirt.virDomain, script: Script, cannot_run: str = "",
                     agent_timeout: float = guest_agent.AGENT_TIMEOUT_SECONDS) -> GuestScriptResult:
    """Run a guest script through the agent with its timeout and retries. A script that outlives its
    timeout goes on in the guest (the agent cannot stop it): it is not retried, and the result says so."""
    started = time.monotonic()
    result = GuestScriptResult(script=shown(script.path, 300), ok=False, attempts=0, exit_code=None, seconds=0.0)
    if cannot_run:
        result.message = f"not run: {cannot_run}"
        return result
    for attempt in range(script.retries + 1):
        result.attempts = attempt + 1
        try:
            done = guest_agent.run(domain, script.path, script.args, script.timeout_seconds)
        except GuestAgentError as e:
            result.message = e.message
            if isinstance(e, guest_agent.AgentNotAnswering):
                break   # another attempt would wait as long again
            continue
        result.exit_code, result.timed_out = done.exitcode, done.timed_out
        result.stdout = shown(done.stdout[-RECORDED_OUTPUT:], None)[-RECORDED_OUTPUT:]
        result.stderr = shown(done.stderr[-RECORDED_OUTPUT:], None)[-RECORDED_OUTPUT:]
        if done.timed_out:
            result.message = f"timed out after {script.timeout_seconds:g} s (it goes on in the guest)"
            break
        if done.exitcode == 0:
            result.ok, result.message = True, ""
            break
        last = (shown(done.stderr.strip().splitlines()[-1], 200) if done.stderr.strip() else
                shown(done.stdout.strip().splitlines()[-1], 200) if done.stdout.strip() else "")
        ended = f"exit code {done.exitcode}" if done.exitcode is not None else f"killed by signal {done.signal}"
        result.message = f"{ended}{': ' + last if last else ''}"
    result.seconds = round(time.monotonic() - started, 3)
    return result
