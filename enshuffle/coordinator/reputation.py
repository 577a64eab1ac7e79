"""Reputation per node key: results accepted and refused (and why), quarantine, re-admission.

The server reports every verdict on a signed result here. Only refusals that prove the node's
own arithmetic wrong count as lies: a result that fails the product check, or a result of the
wrong shape or dtype (both signed with the node's key, so attributable). A forged signature is
not the key's fault (anyone on the network can send one) and is handled as a protocol error.

A key with `quarantine_after` lies is quarantined for the rest of the run: the server ends its
session (its shards move to other nodes), tells it BYE `quarantined`, and answers its HELLOs
with REFUSE `quarantined` naming the last lie. The operator can re-admit a key (console key `a`
on the node's row, or SIGHUP for every quarantined key); its lie count starts again from zero.

Adaptive replication: a key is *trusted* once it has `trust_after` results accepted and no lie;
`needs_replica(key)` says whether the server should also compute this key's result itself and
compare (the `--replicate` option).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

LIES = ("failed-check", "wrong-shape")  # refusals that count toward quarantine
QUARANTINE_AFTER = 3
# REJECTs (the node says it cannot do a batch) in a row, with no accepted result between them,
# that quarantine a key: an honest node rejects now and then (a batch that waited past its lease,
# a full queue); one that rejects everything is withholding its share of the work.
REJECTS_AFTER = 5
TRUST_AFTER = 20


@dataclass
class KeyRecord:
    label: str
    fingerprint: str
    accepted: int = 0
    refused: Counter = field(default_factory=Counter)  # reason -> count (lies and other refusals)
    lies: int = 0  # since the last re-admission
    rejects: int = 0  # REJECTs since the last accepted result (or re-admission)
    quarantined: bool = False
    reason: str = ""  # the last lie, as logged
    quarantined_at: float = 0.0  # time.time()

    def summary(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.refused.items())) or "none"
        return f"{self.accepted} accepted, refused: {why}"


class Reputation:
    """Records per node key (32-byte public key)."""

    def __init__(
        self,
        quarantine_after: int = QUARANTINE_AFTER,
        trust_after: int = TRUST_AFTER,
        rejects_after: int = REJECTS_AFTER,
    ):
        if quarantine_after < 1 or rejects_after < 1:
            raise ValueError("quarantine_after and rejects_after must be >= 1")
        self.quarantine_after = quarantine_after
        self.rejects_after = rejects_after
        self.trust_after = trust_after
        self.records: dict[bytes, KeyRecord] = {}

    def record(self, key: bytes, label: str, fingerprint: str) -> KeyRecord:
        rec = self.records.get(key)
        if rec is None:
            rec = self.records[key] = KeyRecord(label=label, fingerprint=fingerprint)
        return rec

    def accepted(self, key: bytes) -> None:
        rec = self.records.get(key)
        if rec is not None:
            rec.accepted += 1
            rec.rejects = 0

    def refused(self, key: bytes, reason: str, detail: str = "") -> bool:
        """Count a refusal; True if this one quarantines the key (only lies count toward that)."""
        rec = self.records.get(key)
        if rec is None:
            return False
        rec.refused[reason] += 1
        if reason not in LIES or rec.quarantined:
            return False
        rec.lies += 1
        rec.reason = detail or reason
        if rec.lies >= self.quarantine_after:
            rec.quarantined = True
            rec.quarantined_at = time.time()
            return True
        return False

    def rejected(self, key: bytes, code: str, detail: str = "") -> bool:
        """Count a REJECT (not a lie); True if this one quarantines the key: `rejects_after` in a
        row with no accepted result between them."""
        rec = self.records.get(key)
        if rec is None:
            return False
        rec.refused["rejected"] += 1
        if rec.quarantined:
            return False
        rec.rejects += 1
        if rec.rejects >= self.rejects_after:
            rec.quarantined = True
            rec.quarantined_at = time.time()
            rec.reason = f"{rec.rejects} batches rejected in a row, none answered (last: {code}: {detail[:200]})"
            return True
        return False

    def is_quarantined(self, key: bytes) -> bool:
        rec = self.records.get(key)
        return rec is not None and rec.quarantined

    def quarantined(self) -> list[KeyRecord]:
        return [r for r in self.records.values() if r.quarantined]

    def readmit(self, which: str | None = None) -> list[KeyRecord]:
        """Lift quarantine from the key whose label or fingerprint is `which` (every key for None)."""
        done = []
        for rec in self.records.values():
            if rec.quarantined and (which is None or which in (rec.label, rec.fingerprint)):
                rec.quarantined = False
                rec.lies = 0
                rec.rejects = 0
                done.append(rec)
        return done

    def trusted(self, key: bytes) -> bool:
        rec = self.records.get(key)
        return (
            rec is not None
            and rec.lies == 0
            and not any(rec.refused[r] for r in LIES)
            and rec.accepted >= self.trust_after
        )

    def needs_replica(self, key: bytes) -> bool:
        """A new or once-lying key's results are also computed by the coordinator and compared."""
        return not self.trusted(key)
