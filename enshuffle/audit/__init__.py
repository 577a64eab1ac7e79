"""`enshuffle audit`: play an honest-but-curious node against a real run and measure what it learns.

- `recording`: reads what `enshuffle node --record DIR` kept (npz, never pickle).
- `attacks`: the attacker. It sees only the recording and public information (the public
  dataset, the public source code and its constants); it returns its claims.
- `scoring`: compares the claims with ground truth taken from the coordinator's objects.
- `runner`: the command: a short real run on loopback, then attacks, scoring and the table.

The attacker never imports the scorer or the coordinator's objects; nothing below this package
imports it.
"""
