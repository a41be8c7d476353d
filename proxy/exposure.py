"""What `devproxy check` warns about: ports other hosts can reach with nothing to keep strangers out."""

from __future__ import annotations

import ipaddress

from proxy.config import Address, Settings


def is_loopback(address: Address) -> bool:
    """True when only this host can reach `address` (127.0.0.0/8, ::1, "localhost")."""
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False  # a wildcard ("0.0.0.0", "::", "") or a host name: other hosts can reach it


def warnings(settings: Settings) -> list[str]:
    """One line for each port that other hosts reach and that lets anyone in: a device's client port
    with neither `allow` nor a client CA (a TLS port's tls_client_ca), the status server with no token."""
    found = []
    for device in settings.devices:
        where = f"device {device.name!r}"
        if device.allow:
            continue
        for address in device.listen:
            if not is_loopback(address):
                found.append(
                    f"{where}: listen {address} is open to any host: set allow, or use listen_tls with tls_client_ca"
                )
        for address in device.listen_rfc2217:
            if not is_loopback(address):
                # Worse than a plain port: a stranger may also set the line (rate, DTR, break).
                found.append(f"{where}: listen_rfc2217 {address} is open to any host, who may set the line: set allow")
        for address in device.listen_tls if not device.tls_client_ca else ():
            if not is_loopback(address):
                found.append(f"{where}: listen_tls {address} lets in any host: set allow or tls_client_ca")
    dialin = settings.dialin
    if dialin is not None and not dialin.allow:
        direct = Address(dialin.direct_host, 0)
        if not is_loopback(direct) and not (dialin.direct_tls and dialin.direct_tls_client_ca):
            found.append(
                f"[dialin]: direct ports on {dialin.direct_host} are open to any host: set allow, or direct_tls "
                "with direct_tls_client_ca"
            )
    status = settings.proxy.status
    if status is not None and not is_loopback(status) and not settings.proxy.status_token:
        found.append(f"[proxy]: status {status} is open to any host with no status_token")
    return found
