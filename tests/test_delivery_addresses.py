"""Which addresses an endpoint may point at when private endpoints are not allowed."""
from __future__ import annotations

import ipaddress

import pytest

from alerting_app.channels.addresses import RefusedAddress, check_public_host, non_public_kind


@pytest.mark.parametrize(("address", "kind"), [
    ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("127.0.0.53", "loopback"), ("fe80::1", "link-local"),
    ("172.16.5.4", "private"), ("fd00::1", "private"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"),
    ("192.0.2.1", "private"), ("::ffff:127.0.0.1", "loopback"),
])
def test_addresses_are_classified_public_or_not(address, kind):
    assert non_public_kind(ipaddress.ip_address(address)) == kind


async def test_a_host_name_is_checked_by_every_address_it_resolves_to():
    with pytest.raises(RefusedAddress, match="localhost resolves to"):
        await check_public_host("localhost", 80)
    await check_public_host("93.184.216.34", 443)
