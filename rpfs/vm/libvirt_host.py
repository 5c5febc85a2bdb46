"""The connection to libvirtd and a domain looked up by name: libvirt's failures become one-line RpfsErrors.

libvirt's C library prints every error to stderr through its default handler before Python sees the
exception; a no-op handler is registered once so the user reads rpfs's one line and nothing else.
"""
from __future__ import annotations

import libvirt

from rpfs.errors import RpfsError
from rpfs.host.untrusted import shown

DEFAULT_URI = "qemu:///system"
NOT_RUNNING = ("libvirtd is not running (start it: tools/libvirt start here, `systemctl start libvirtd`"
               " elsewhere)")
MESSAGE_CHARS = 300      # libvirt's own text, cut to this
NAMES_SHOWN = 20         # an unknown domain's error names at most this many known ones

# virDomainState, as words (libvirt.VIR_DOMAIN_*)
STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no-state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut-off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def _ignore(_context, _error) -> None:
    """libvirt's error handler: say nothing (the exception carries the error)."""


libvirt.registerErrorHandler(_ignore, None)


def one_line(text: str, limit: int = MESSAGE_CHARS) -> str:
    """libvirt's (or a domain's) text as one printable line: whitespace runs joined, the rest escaped, bounded."""
    return shown(" ".join(str(text).split()), limit)


def error_text(error: libvirt.libvirtError) -> str:
    return one_line(error.get_error_message() or str(error))


def connect(uri: str = DEFAULT_URI) -> libvirt.virConnect:
    """Open libvirtd's connection; libvirtd not running is one line saying how to start it."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR,
                                  libvirt.VIR_ERR_RPC) and _socket_missing(e):
            raise RpfsError(NOT_RUNNING) from None
        raise RpfsError(f"cannot connect to libvirt at {one_line(uri)}: {error_text(e)}") from None
    if conn is None:   # older bindings returned None rather than raising
        raise RpfsError(NOT_RUNNING)
    return conn


def _socket_missing(error: libvirt.libvirtError) -> bool:
    """Whether libvirt failed because nothing listens on its socket (libvirtd not started)."""
    text = (error.get_error_message() or "").lower()
    return any(s in text for s in ("no such file or directory", "connection refused", "failed to connect socket"))


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """The domain called name; an unknown one is one line naming the domains there are."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise RpfsError(f"cannot look up domain {one_line(name, 100)}: {error_text(e)}") from None
    raise RpfsError(f"no libvirt domain {one_line(name, 100)} (domains: {known_names(conn)})")


def exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise RpfsError(f"cannot look up domain {one_line(name, 100)}: {error_text(e)}") from None


def known_names(conn: libvirt.virConnect) -> str:
    """The domains' names, sorted, at most NAMES_SHOWN of them, as one line."""
    try:
        names = sorted(d.name() for d in conn.listAllDomains())
    except libvirt.libvirtError as e:
        return f"cannot list them: {error_text(e)}"
    if not names:
        return "none"
    more = f", and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(one_line(n, 100) for n in names[:NAMES_SHOWN]) + more


def state(domain: libvirt.virDomain) -> str:
    """running | shut-off | paused | blocked | shutting-down | crashed | suspended | no-state."""
    try:
        code, _reason = domain.state()
    except libvirt.libvirtError as e:
        raise RpfsError(f"cannot read the state of domain {one_line(domain.name(), 100)}: {error_text(e)}") from None
    return STATES.get(code, f"state-{code}")


def domain_xml(domain: libvirt.virDomain, inactive: bool = False) -> str:
    """The domain's XML: as it runs, or (inactive) as it is defined (what a restart would use)."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    try:
        return domain.XMLDesc(flags)
    except libvirt.libvirtError as e:
        raise RpfsError(f"cannot read the XML of domain {one_line(domain.name(), 100)}: {error_text(e)}") from None


def define(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    """Define (not start) a domain from its XML; libvirt's refusal is one line."""
    try:
        return conn.defineXML(xml)
    except libvirt.libvirtError as e:
        raise RpfsError(f"libvirt refused to define the domain: {error_text(e)}") from None


def start(domain: libvirt.virDomain) -> None:
    try:
        domain.create()
    except libvirt.libvirtError as e:
        raise RpfsError(f"cannot start domain {one_line(domain.name(), 100)}: {error_text(e)}") from None
