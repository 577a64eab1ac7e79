"""`admission.decide`: every reason a verified HELLO is refused, in the order the server asks them,
and when a reconnecting key replaces its old session. Plain objects, no socket."""

from __future__ import annotations

from dataclasses import dataclass

from enshuffle.coordinator.admission import Admission, Admit, Refuse, decide
from enshuffle.coordinator.reputation import Reputation
from enshuffle.protocol.keys import Identity, fingerprint, short_fingerprint
from enshuffle.protocol.messages import OPS, PROTOCOL_VERSION

KEY = Identity.generate().public_bytes
NOW = 1000.0


@dataclass
class Twin:
    node_id: str
    last_seen: float
    address: str = "tcp://10.0.0.2:4000"
    label: str = "alice"


def hello(**fields) -> dict:
    header = {
        "protocol": PROTOCOL_VERSION,
        "name": "alice",
        "nonce": "00" * 16,
        "capabilities": {"ops": list(OPS), "credit": 2},
    }
    header.update(fields)
    return header


def verdict(header: dict | None = None, **given) -> Admit | Refuse:
    options = dict(
        admission=None,
        finished=False,
        banned=False,
        quarantine=None,
        twins=(),
        sessions=0,
        max_sessions=10,
        heartbeat_ms=1000,
        now=NOW,
    )
    options.update(given)
    return decide(KEY, header or hello(), "challenge", **options)


def test_an_admitted_key_is_welcomed_with_how_it_got_in():
    assert verdict() == Admit("open")
    assert verdict(admission=Admission(auto={KEY})) == Admit("local")


def test_each_refusal_has_its_code_and_says_why():
    assert verdict(hello(protocol=PROTOCOL_VERSION + 1)).code == "version-mismatch"
    assert verdict(finished=True) == Refuse("run-finished", "training has ended")
    banned = verdict(banned=True)
    assert banned.code == "not-allowed" and "evicted" in banned.text
    stranger = verdict(admission=Admission())  # admits nobody
    assert stranger.code == "not-allowed" and "is not admitted here" in stranger.text
    reputation = Reputation(quarantine_after=1)
    reputation.record(KEY, "alice", "fp")
    reputation.refused(KEY, "failed-check", "entry (3, 4) is off")
    quarantined = verdict(quarantine=reputation.records[KEY])
    assert quarantined.code == "quarantined" and "1 wrong results" in quarantined.text
    assert "entry (3, 4) is off" in quarantined.text
    for caps in ({"ops": ["matmul"], "credit": 2}, {"ops": list(OPS), "credit": 0}, "none"):
        assert verdict(hello(capabilities=caps)).code == "bad-hello"
    busy = verdict(sessions=10)
    assert busy.code == "busy" and "at most 10 nodes" in busy.text


def test_the_first_reason_that_holds_is_the_one_given():
    """A finished run says so even to a stranger; the protocol version comes before everything."""
    assert verdict(finished=True, admission=Admission()).code == "run-finished"
    assert verdict(hello(protocol=0), finished=True, banned=True).code == "version-mismatch"
    assert verdict(banned=True, sessions=10).code == "not-allowed"


def test_a_second_process_with_a_live_key_is_refused_and_the_operator_told():
    live = Twin("n3", last_seen=NOW - 0.5)
    refused = verdict(twins=[live], sessions=1)
    assert refused.code == "duplicate-key"
    assert live.address in refused.text and "as alice" in refused.text
    assert f"another node with key {short_fingerprint(fingerprint(KEY))} is already connected" in refused.text
    assert refused.warn and "each process needs its own --name" in refused.warn


def test_a_reconnect_replaces_its_old_session():
    quiet = Twin("n3", last_seen=NOW - 5.0)  # silent for more than two heartbeats: the node came back
    assert verdict(twins=[quiet], sessions=1) == Admit("open", (quiet,))
    live = Twin("n3", last_seen=NOW - 0.5)  # heard from recently, but the node names it in `replaces`
    assert verdict(hello(replaces="n3"), twins=[live], sessions=1) == Admit("open", (live,))
    assert verdict(hello(replaces="n9"), twins=[live], sessions=1).code == "duplicate-key"


def test_a_replaced_session_does_not_count_toward_the_limit():
    quiet = Twin("n3", last_seen=NOW - 5.0)
    assert isinstance(verdict(twins=[quiet], sessions=10, max_sessions=10), Admit)
    assert verdict(twins=[], sessions=10, max_sessions=10).code == "busy"
