"""Decoys: a batch's deltas leave with their class structure moved onto other rows.

Rows of a delta for one class point alike (dz2's one-hot shape times w2^T): clustering them groups
a batch by class, and a static row seen in several batches links the groups into one grouping of
the whole training set. `decoy` takes each class's mean row and its DECOY_RANK principal
directions (within the batch) off its rows and gives them to random other rows instead; the
disguise that sends the delta subtracts what that adds to its product (pixel_share.py's dw1,
hidden_share.py's backward).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DECOY_RANK = 2  # per class and batch: dz1's mean and this many principal directions move to other rows
DECOY_GRAM_ROWS = 1024  # full batch: a class's principal directions are estimated from this many of its rows
# q = classes * (1 + DECOY_RANK) for the ten classes: the directions moved per batch, what undoing
# the decoys costs the coordinator per row and column of the product (offload.py)
DECOY_ROWS = 10 * (1 + DECOY_RANK)

# What a product is given to make its decoys: delta -> (sent, delta, directions) (`decoy` with the
# batch's labels and the run's secret generator).
Decoy = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def decoy(dz1: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dz1 (b,128) with its class structure moved onto random rows: (sent, delta, directions)
    with sent = dz1 + delta @ directions, drawn from `rng` (the run's secret generator).

    Each class's mean row and its DECOY_RANK principal directions (within the batch) are taken
    off its rows and given to a random other row instead: the node sees clusters of random rows,
    and no class sums to zero. delta is (b, q), directions (q, 128), q = classes * (1 + DECOY_RANK): what the
    coordinator subtracts costs b * 784 * q multiply-adds. All classes at once: one batched
    eigenproblem over the smaller Gram matrices, no loop over classes or rows."""
    d = dz1.astype(np.float64, copy=False)  # read only
    n, m = d.shape
    r = DECOY_RANK
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    c = counts.shape[0]
    onehot = np.zeros((n, c))
    onehot[np.arange(n), inverse] = 1.0
    means = (onehot.T @ d) / counts[:, None]  # (c, m)
    if n <= 4 * m:
        centered = d - means[inverse]
        # Mini-batch: a class has a dozen rows. Rows grouped by class and zero-padded to
        # (c, width, m) (padding adds nothing to a Gram): one batched eigenproblem on the small
        # (width x width) Grams.
        order = np.argsort(inverse, kind="stable")
        starts = np.cumsum(counts) - counts
        slot = np.empty(n, dtype=np.int64)
        slot[order] = np.arange(n) - np.repeat(starts, counts)
        padded = np.zeros((c, int(counts.max()), m))
        padded[inverse, slot] = centered
        vectors = np.linalg.eigh(padded @ padded.transpose(0, 2, 1))[1][:, :, -r:]  # (c, width, r)
        top = padded.transpose(0, 2, 1) @ vectors  # (c, m, r)
        top /= np.maximum(np.linalg.norm(top, axis=1, keepdims=True), 1e-300)
        weights = (centered @ top.transpose(1, 0, 2).reshape(m, c * r)).reshape(n, c, r)
    else:
        # Full batch: thousands of rows a class. Each class's principal directions from the
        # (m x m) Gram of at most DECOY_GRAM_ROWS of its rows drawn at random (a loop over the
        # at most 10 classes, not over rows); then one batched eigenproblem. The centred rows
        # are never formed: (d_i - mean) @ top = d_i @ top - mean @ top.
        order = np.argsort(inverse, kind="stable")
        grams = []
        for e, k, mean in zip(np.cumsum(counts), counts, means):
            members = order[e - k : e]
            if k > DECOY_GRAM_ROWS:
                members = rng.choice(members, DECOY_GRAM_ROWS, replace=False)
            g = np.take(d, members, axis=0) - mean
            grams.append(g.T @ g)
        top = np.linalg.eigh(np.stack(grams))[1][:, :, -r:]  # (c, m, r)
        flat = top.transpose(1, 0, 2).reshape(m, c * r)
        weights = (d @ flat - (means @ flat)[inverse]).reshape(n, c, r)
    weights *= onehot[:, :, None]  # each row's weight on its own class's directions only
    structure = np.concatenate([onehot, weights.reshape(n, c * r)], axis=1)  # (n, q)
    directions = np.concatenate([means, top.transpose(0, 2, 1).reshape(c * r, m)])  # (q, m)
    delta = np.take(structure, rng.permutation(n), axis=0) - structure
    sent = delta @ directions
    sent += d
    return sent.astype(dz1.dtype, copy=False), delta, directions
