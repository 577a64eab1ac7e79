"""Errors every layer may raise and the command line turns into one-line messages.

The bottom of the package: it imports nothing of enshuffle, so the protocol, the node and the
coordinator can raise a UsageError without importing the CLI (the top layer) to get it.
"""

from __future__ import annotations


class UsageError(Exception):
    """A command-line value, file or setting that is wrong; the message says which and what to do."""
