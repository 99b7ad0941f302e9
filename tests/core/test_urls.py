"""core/models.py: the URLs Tether sends requests to, as the schema states
them (`SENDABLE_URL`, `HTTP_URL`), and `url_fault` saying what is wrong."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import pytest
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.models import HOST_RULE, HTTP_URL, SENDABLE_URL, url_fault

EXAMPLES = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))


@EXAMPLES
@given(st.from_regex(HTTP_URL) | st.from_regex(SENDABLE_URL))
def test_every_url_the_patterns_allow_is_one_the_http_client_can_send_to(url: str):
    """What fits the schema's pattern is read by Python's parser and by the
    HTTP client's (yarl, validating its host), so a job taken is one whose
    requests can be sent: before, a host the IDNA encoding refuses or a port
    past 65535 was taken and failed at every trigger."""
    parts = urlsplit(url)
    assert parts.scheme.lower() in ("http", "https")
    port = parts.port  # raises for a port out of range
    assert port is None or 1 <= port <= 65535
    if parts.netloc.startswith("["):
        assert ipaddress.ip_address(parts.hostname or "").version == 6
    sent = yarl.URL(url)
    assert sent.host and sent.port
    if re.fullmatch(r"[0-9.]+", sent.host):  # aiohttp: "not a canonical IPv4 address"
        assert str(ipaddress.IPv4Address(sent.host)) == sent.host
    yarl.URL.build(scheme=sent.scheme, host=sent.raw_host or "", port=sent.port)  # validates


@EXAMPLES
@given(
    st.sampled_from(["http://", "HTTPS://", "ftp://", "http:/"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
    | st.from_regex(r"[a-z0-9.:\[\]%@/ -]{0,30}", fullmatch=True),
)
def test_url_fault_is_empty_exactly_when_the_pattern_matches(start: str, rest: str):
    url = start + rest
    assert (url_fault(url) == "") == (HTTP_URL.fullmatch(url) is not None)
    assert (url_fault(url, SENDABLE_URL) == "") == (SENDABLE_URL.match(url) is not None)


NO_HOST = f"names no host and port a request can be sent to ({HOST_RULE})"


@pytest.mark.parametrize(
    ("url", "fault"),
    [
        ("http://hooks.example.com/x", ""),
        ("HTTPS://Ex-am_ple.com.:65535/x?q#f", ""),
        ("http://10.0.0.7:8080", ""),
        ("http://[::1]:8443/x", ""),
        ("http://[2001:db8::10.0.0.1]/x", ""),
        ("http://xn--bcher-kva.example/", ""),
        ("ftp://hooks.example.com/x", "is not an http or https URL"),
        ("hooks.example.com/x", "is not an http or https URL"),
        ("https://user:s3cret@hooks.example.com/x", "carries user:password@"),
        ("http://x:99999/", NO_HOST),
        ("http://x:0/", NO_HOST),
        ("http://x:/", NO_HOST),
        ("http://x:8o/", NO_HOST),
        ("http://bücher.example/", NO_HOST),  # the xn-- form is the way
        ("http://a%41.example/", NO_HOST),
        ("http://e\u200bvil.example/", NO_HOST),  # a format character
        ("http://" + "a" * 64 + ".example/", NO_HOST),
        ("http://a..b/", NO_HOST),
        ("http://1.2.3.4/", ""),
        ("http://a.1/", ""),  # (a name: looked up)
        ("http://999.0.0.1/", NO_HOST),  # digits and dots: an IPv4 address or nothing
        ("http://1.2.3.4.5/", NO_HOST),
        ("http://1.2.3/", NO_HOST),
        ("http://123:80/", NO_HOST),
        ("http://10.0.0.256/", NO_HOST),
        ("http://10.0.0.1./", NO_HOST),
        ("http://[1:2:3]/", NO_HOST),
        ("http://[fe80::1%25eth0]/", NO_HOST),
        ("https://", NO_HOST),
        ("http://x/a b", "holds a space or a control character"),
        ("http://x\n", NO_HOST),  # Python's `$` matches before a last newline
        ("http://x/a\n", "holds a space or a control character"),
        # C1 controls, Unicode's spaces, an invisible override: a review, 2026-12-07
        *(
            (f"http://x/a{c}b", "holds a space or a control character")
            for c in "\x85\x9b\xa0\u2028\u3000\u202e\ufeff"
        ),
        ("http://x/\u00e9?q=\u00fc#f", ""),  # other characters past ASCII are sent encoded
    ],
)
def test_url_fault_names_what_is_wrong_without_quoting_the_url(url: str, fault: str):
    assert url_fault(url) == fault
    assert "s3cret" not in url_fault(url)
