"""Every URL form a topology is opened from, good and bad, and what a bad one's error says."""

from __future__ import annotations

import pytest

from syncmap.errors import ConfigurationError
from syncmap.store.endpoint import Endpoint, Tls, redact_url
from syncmap.store.sentinel import SentinelTopology
from syncmap.store.topology import Standalone, open_topology

GOOD = [
    ("redis://h:7000/2", Endpoint("h", 7000, db=2, socket_timeout=3.0, connect_timeout=3.0)),
    ("redis://h", Endpoint("h", 6379, socket_timeout=3.0, connect_timeout=3.0)),
    (
        "redis://:s3cret@h:1/0",
        Endpoint("h", 1, password="s3cret", socket_timeout=3.0, connect_timeout=3.0),
    ),
    (
        "redis://app:p%40ss@h:1/0",
        Endpoint("h", 1, username="app", password="p@ss", socket_timeout=3.0, connect_timeout=3.0),
    ),
    (
        "redis://h:1/0?socket_timeout=0.25",
        Endpoint("h", 1, socket_timeout=0.25, connect_timeout=3.0),
    ),
    (
        "unix:///run/r.sock?db=3",
        Endpoint(path="/run/r.sock", db=3, socket_timeout=3.0, connect_timeout=3.0),
    ),
    (
        "rediss://h:6380/0?ssl_ca_certs=/ca.crt&ssl_certfile=/c.crt&ssl_keyfile=/c.key",
        Endpoint(
            "h",
            6380,
            tls=Tls("/ca.crt", "/c.crt", "/c.key"),
            socket_timeout=3.0,
            connect_timeout=3.0,
        ),
    ),
    (
        "rediss://h:6380/0?ssl_cert_reqs=none",
        Endpoint(
            "h",
            6380,
            tls=Tls(cert_reqs="none", check_hostname=False),
            socket_timeout=3.0,
            connect_timeout=3.0,
        ),
    ),
]


@pytest.mark.parametrize(("url", "endpoint"), GOOD)
def test_good_standalone_urls(url: str, endpoint: Endpoint) -> None:
    topology = open_topology(url, timeout=3.0)
    assert isinstance(topology, Standalone)
    assert topology.endpoint() == endpoint
    assert "s3cret" not in topology.where and "p@ss" not in repr(topology.endpoint())


BAD = [
    ("http://h:1/0", "use redis://"),
    ("h:6379", "use redis://host:6379/0"),
    ("redis://h:1/x", "the database must be a number"),
    ("redis://h:port/0", "the port is not a number"),
    ("redis://h:1/0?protocol=3", "unknown option 'protocol'"),
    ("redis://h:1/0?socket_timeout=0", "socket_timeout must be a number of seconds > 0"),
    ("redis://h:1/0?socket_timeout=1&socket_timeout=2", "given twice"),
    ("redis://h:1/0?ssl_ca_certs=/ca", "ssl_\\* options need rediss://"),
    ("rediss://h:1/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be none, optional or required"),
    ("rediss://h:1/0?ssl_check_hostname=perhaps", "ssl_check_hostname must be true or false"),
    ("unix://", "give the socket path"),
    ("redis+sentinel://h1:26379", "give the service"),
    ("redis+sentinel://h1:26379/svc/0/extra", "give the service"),
    ("redis+sentinel://h1:26379,:1/svc", "a sentinel address is empty"),
    ("redis+sentinel://h1:x/svc", "the port of sentinel 'h1:x' is not a number"),
    ("redis+sentinel://h1/svc/zero", "the database must be a number"),
    ("redis+sentinel://h1/svc?sentinel_timeout=-1", "sentinel_timeout must be"),
    ("redis+sentinel://h1/svc?ssl_ca_certs=/ca", "need rediss\\+sentinel://"),
    ("redis+sentinel://u:hunter2@h1/svc?bogus=1", "unknown option 'bogus'"),
]


@pytest.mark.parametrize(("url", "message"), BAD)
def test_bad_urls_say_what_to_fix(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        open_topology(url, timeout=1.0)
    assert "hunter2" not in str(caught.value)


def test_no_url_and_no_client_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNCMAP_URL", raising=False)
    with pytest.raises(ConfigurationError, match=r"pass url=.* or set SYNCMAP_URL"):
        open_topology(timeout=1.0)
    monkeypatch.setenv("SYNCMAP_URL", "redis://from-env:7001/4")
    assert open_topology(timeout=1.0).endpoint() == Endpoint(
        "from-env", 7001, db=4, socket_timeout=1.0, connect_timeout=1.0
    )


def test_sentinel_urls_split_master_and_sentinel_credentials() -> None:
    url = (
        "rediss+sentinel://app:pw@s1:26379,[::1]:26380,s3/cache/2?sentinel_password=spw"
        "&sentinel_username=watch&sentinel_timeout=0.2&ssl_ca_certs=/ca&socket_timeout=4"
    )
    topology = open_topology(url, timeout=9.0)
    assert isinstance(topology, SentinelTopology)
    assert topology.service == "cache"
    assert [s.address for s in topology.sentinels] == ["s1:26379", "::1:26380", "s3:26379"]
    sentinel = topology.sentinels[0]
    assert (sentinel.username, sentinel.password, sentinel.socket_timeout) == ("watch", "spw", 0.2)
    assert sentinel.db == 0 and sentinel.tls == Tls("/ca")
    master = topology._template
    assert (master.username, master.password, master.db) == ("app", "pw", 2)
    assert (master.socket_timeout, master.connect_timeout, master.tls) == (4.0, 9.0, Tls("/ca"))
    assert "pw" not in topology.where
    # One topology per key and process: the same URL gives the same object (one watcher).
    assert open_topology(url, timeout=9.0) is topology
    topology.close()


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
