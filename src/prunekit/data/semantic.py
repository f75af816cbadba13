"""Scores and groups from an embedding space: k-means (FAISS), self-supervised prototypes, SemDeDup.

- `kmeans`: FAISS k-means, spherical (centroids kept unit length, inner-product assignment) for normalised
  embeddings; trained on a seeded sample of at most `max_points_per_centroid` points per centroid, then every point
  is assigned in chunks, so a memory-mapped million-row array is never copied whole.
- `prototype_scores` (Sorscher et al. 2022, "Beyond neural scaling laws", self-supervised prototype metric): the
  cosine distance of each example to its nearest k-means centroid; higher = farther from the prototype = harder.
- `semdedup` (Abbas et al. 2023, "SemDeDup", and their reference code): spherical k-means; each cluster's members
  are ordered by cosine distance to the centroid, most central first by default, so that the most prototypical
  member of a duplicate group survives (`keep="farthest"` reverses the order and keeps the hardest member, the
  reference code's `keep_hard` setting; ties in input order either way); an example is removed when its largest cosine
  similarity to any example EARLIER in that order exceeds `threshold` (the paper's max of the upper-triangular
  similarity matrix), whether or not that earlier example is itself removed. A chain A~B~C (A~C below the
  threshold) therefore loses B and C. `rule="greedy"` instead compares an example with the earlier *kept* examples
  only (C stays); every example it removes has a kept example above the threshold, which the paper's rule does not
  promise. Each example's group is the input index of the kept example it leads back to (following, from a removed
  example, the earlier example it is most similar to); `SemDeDupResult.kept` lists the kept examples. As in the
  paper, duplicates that k-means puts in different clusters are not compared.

Scale: similarities are computed in blocks of `block` × `block` rows, and clusters larger than `max_cluster_size`
are split by a further k-means (their members keep the order of the first clustering), so time is about
N × cluster size × dim / 2 and memory a few blocks; 1,000,000 × 384 float32 embeddings run in well under a minute
on 2 cores (bench/data_throughput.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError

_CHUNK = 65536  # rows per chunk when scanning or assigning a (possibly memory-mapped) array


def check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """Raise `PrunekitError` unless `embeddings` is a non-empty 2-D float array of finite values."""
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2:
        shape = getattr(embeddings, "shape", None)
        raise PrunekitError(f"embeddings must be a 2-D numpy array (examples × dim), got shape {shape}")
    if len(embeddings) == 0 or embeddings.shape[1] == 0:
        raise PrunekitError(f"embeddings have shape {embeddings.shape}; need at least one example and one dimension")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise PrunekitError(f"embeddings have dtype {embeddings.dtype}; expected float32 or float64")
    for start in range(0, len(embeddings), _CHUNK):
        chunk = embeddings[start : start + _CHUNK]
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise PrunekitError(
                f"embeddings hold NaN or infinite values ({int(bad.sum())} rows in rows {start}.., first row {row}); "
                "fix the inputs or the model that produced them"
            )
    return embeddings


def default_clusters(n: int) -> int:
    """Number of k-means clusters used when none is given: about sqrt(n), with at least 40 points per cluster."""
    return max(1, min(round(math.sqrt(n)), n // 40))


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise PrunekitError(f"number of clusters k must be an integer in [1, {n}] (the number of examples), got {k!r}")
    return int(k)


@contextlib.contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    """Limit FAISS (OpenMP) and numpy (BLAS) threads inside the block, when `threads` is given."""
    if threads is None:
        yield
        return
    import faiss
    from threadpoolctl import threadpool_limits

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def assign(
    embeddings: np.ndarray, centroids: np.ndarray, *, spherical: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row, in chunks: `(assignment int64, similarity or squared distance float32)`.

    Spherical: the largest inner product with a unit centroid (the rows are normalised first); otherwise the
    smallest squared Euclidean distance.
    """
    import faiss

    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1]) if spherical else faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    assignment = np.empty(len(embeddings), dtype=np.int64)
    value = np.empty(len(embeddings), dtype=np.float32)
    for start in range(0, len(embeddings), _CHUNK):
        chunk = embeddings[start : start + _CHUNK]
        chunk = _normalised(chunk) if spherical else np.ascontiguousarray(chunk, dtype=np.float32)
        found, nearest = index.search(chunk, 1)
        assignment[start : start + len(chunk)] = nearest[:, 0]
        value[start : start + len(chunk)] = found[:, 0]
    return assignment, value


def kmeans(
    embeddings: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means: `(centroids float32 (k, dim), assignment int64 (N,))`, deterministic under `seed`.

    Trained on a seeded uniform sample of at most `k * max_points_per_centroid` rows (FAISS's own default cap);
    `spherical` normalises rows and centroids (cosine k-means, for L2-normalised embeddings).
    """
    check_embeddings(embeddings)
    k = _check_k(k, len(embeddings))
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
        raise PrunekitError(f"niter must be an integer >= 1, got {niter!r}")
    centroids, assignment, _ = _kmeans(embeddings, k, seed=seed, niter=niter, spherical=spherical,
                                       max_points_per_centroid=max_points_per_centroid, threads=threads)
    return centroids, assignment


def _kmeans(embeddings: np.ndarray, k: int, *, seed: int, niter: int, spherical: bool, max_points_per_centroid: int,
            threads: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(centroids, assignment, similarity or squared distance to the assigned centroid)`; see `kmeans`."""
    n, dim = embeddings.shape
    rng = np.random.default_rng(seed)
    sample_size = min(n, k * max_points_per_centroid)
    sample_idx = np.sort(rng.choice(n, size=sample_size, replace=False)) if sample_size < n else np.arange(n)
    sample = np.asarray(embeddings[sample_idx], dtype=np.float32)
    sample = _normalised(sample) if spherical else np.ascontiguousarray(sample)
    with _thread_limit(threads):
        if k == 1:
            centroids = sample.mean(axis=0, keepdims=True)
            centroids = _normalised(centroids) if spherical else centroids
        else:
            import faiss

            # FAISS seeds its own sampling and initialisation from `seed`; min_points_per_centroid=1 silences its
            # warning for small inputs, which are legitimate here.
            km = faiss.Kmeans(dim, k, niter=niter, seed=int(seed) % (2**31), spherical=spherical, verbose=False,
                              max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
            km.train(sample)
            centroids = km.centroids.copy()
        assignment, value = assign(embeddings, centroids, spherical=spherical)
    return centroids, assignment, value


def prototype_scores(
    embeddings: np.ndarray,
    k: int | None = None,
    *,
    seed: int = 0,
    niter: int = 20,
    threads: int | None = None,
) -> np.ndarray:
    """Cosine distance of each example to its nearest spherical k-means centroid, float64 (N,); higher = harder.

    Sorscher et al. 2022's self-supervised prototype metric: examples far from every prototype are atypical
    (hard), those close to one are prototypical (easy). `k` defaults to `default_clusters(N)`.
    """
    k = default_clusters(len(embeddings)) if k is None else k
    centroids, _ = kmeans(embeddings, k, seed=seed, niter=niter, spherical=True, threads=threads)
    with _thread_limit(threads):
        _, similarity = assign(embeddings, centroids, spherical=True)
    return 1.0 - similarity.astype(np.float64)


RULES = ("paper", "greedy")
KEEP_ORDERS = ("central", "farthest")


@dataclass
class SemDeDupResult:
    """SemDeDup's output.

    `groups`: input index of the kept example each example leads back to (its own if kept). `similarity`: the
    largest cosine similarity to an earlier example of its cluster that the rule compares it with (any earlier one
    for "paper", earlier kept ones for "greedy"); an example is removed exactly when this exceeds the threshold, and
    it is -1 (the lowest cosine similarity) when there is nothing earlier to compare with. So the kept member of a
    group has its lowest value and `dedup_select(groups, similarity)` keeps the same examples as `kept`. Also the
    k-means `assignment`, the `k` used, the `rule` and the `keep` order.
    """

    groups: np.ndarray
    similarity: np.ndarray
    assignment: np.ndarray
    k: int
    rule: str
    keep: str

    @property
    def kept(self) -> np.ndarray:
        """Sorted input indices of the kept examples, one per group."""
        return np.flatnonzero(self.groups == np.arange(len(self.groups)))

    @property
    def duplicates(self) -> int:
        """How many examples are removed as duplicates."""
        return int((self.groups != np.arange(len(self.groups))).sum())


def _update_best(best: np.ndarray, best_at: np.ndarray, s: np.ndarray, cols: np.ndarray) -> None:
    """Fold a (rows × candidates) similarity block into each row's running maximum and its column (ties: first)."""
    j = s.argmax(axis=1)
    v = s[np.arange(len(j)), j]
    better = v > best
    best[better], best_at[better] = v[better], cols[j[better]]


def _most_similar_earlier(x: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows in order: each row's largest similarity to any earlier row and that row's index (-inf, -1 for
    the first), i.e. the column maxima of the upper-triangular similarity matrix, computed in square blocks.
    `upper` is the (block × block) mask of the upper triangle with its diagonal: the pairs not yet compared."""
    m, block = len(x), len(upper)
    best = np.full(m, -np.inf, dtype=np.float32)
    best_at = np.full(m, -1, dtype=np.int64)
    for start in range(0, m, block):
        stop = min(start + block, m)
        rows = x[start:stop]
        for c in range(0, start, block):
            _update_best(best[start:stop], best_at[start:stop], rows @ x[c : c + block].T, np.arange(c, c + block))
        s = rows @ rows.T
        np.copyto(s, -np.inf, where=upper[: stop - start, : stop - start])  # strictly earlier rows of the block only
        _update_best(best[start:stop], best_at[start:stop], s, np.arange(start, stop))
    return best, best_at


def _most_similar_earlier_kept(x: np.ndarray, threshold: float, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The greedy rule: like `_most_similar_earlier`, but against the earlier rows that are kept, where a row is kept
    when no earlier kept row is more similar than `threshold`."""
    m, block = len(x), len(upper)
    best = np.full(m, -np.inf, dtype=np.float32)
    best_at = np.full(m, -1, dtype=np.int64)
    kept = np.zeros(m, dtype=bool)
    for start in range(0, m, block):
        stop = min(start + block, m)
        rows = x[start:stop]
        earlier = np.flatnonzero(kept[:start])
        for c in range(0, len(earlier), block):
            cols = earlier[c : c + block]
            _update_best(best[start:stop], best_at[start:stop], rows @ x[cols].T, cols)
        # Within the block, in order: only rows with an earlier similar row in the block need the sequential pass.
        s = rows @ rows.T
        similar = np.tril(s > threshold, -1)
        block_kept = best[start:stop] <= threshold
        for r in np.flatnonzero(similar.any(axis=1) & block_kept):
            block_kept[r] = not (similar[r, :r] & block_kept[:r]).any()
        kept[start:stop] = block_kept
        s[:, ~block_kept] = -np.inf
        np.copyto(s, -np.inf, where=upper[: stop - start, : stop - start])
        _update_best(best[start:stop], best_at[start:stop], s, np.arange(start, stop))
    return best, best_at


def _dedup_cluster(x: np.ndarray, threshold: float, rule: str, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup of one cluster's unit rows, in keep order: `(local index of the kept row each row leads back to,
    the largest similarity compared with the threshold)`; `upper` as in `_most_similar_earlier`."""
    if rule == "paper":
        best, best_at = _most_similar_earlier(x, upper)
    else:
        best, best_at = _most_similar_earlier_kept(x, threshold, upper)
    removed = best > threshold
    root = np.where(removed, best_at, np.arange(len(x)))
    # Pointer jumping: every pointer goes to an earlier row, so this reaches the kept roots in log(depth) steps.
    while True:
        jumped = root[root]
        if np.array_equal(jumped, root):
            return root, best
        root = jumped


def _clusters(
    embeddings: np.ndarray, assignment: np.ndarray, max_cluster_size: int, seed: int, niter: int
) -> Iterator[np.ndarray]:
    """Input indices of each cluster in ascending order; clusters above `max_cluster_size` split by k-means."""
    order = np.argsort(assignment, kind="stable")
    bounds = np.flatnonzero(np.diff(assignment[order])) + 1
    for members in np.split(order, bounds):
        if len(members) <= max_cluster_size:
            yield members
            continue
        parts = math.ceil(len(members) / max_cluster_size) * 2  # k-means parts are uneven; aim at half the cap
        _, sub, _ = _kmeans(embeddings[members], min(parts, len(members)), seed=seed, niter=niter, spherical=True,
                            max_points_per_centroid=256, threads=None)
        if len(np.unique(sub)) == 1:  # identical points cannot be split: the cost is one large cluster
            yield members
            continue
        for part in _clusters(embeddings[members], sub, max_cluster_size, seed, niter):
            yield members[part]


def semdedup(
    embeddings: np.ndarray,
    *,
    threshold: float,
    k: int | None = None,
    rule: str = "paper",
    keep: str = "central",
    seed: int = 0,
    niter: int = 10,
    max_points_per_centroid: int = 64,
    max_cluster_size: int = 10_000,
    block: int = 2048,
    threads: int | None = None,
    progress: bool = True,
) -> SemDeDupResult:
    """SemDeDup (Abbas et al. 2023) with cosine similarity `threshold` in (0, 1); see the module docstring.

    `rule` is "paper" (removed when similar to any earlier example; default) or "greedy" (to an earlier kept one).
    `keep` orders each cluster, and so decides which member of a duplicate group survives: "central" (most
    prototypical; default) or "farthest" from the centroid (the hardest, the reference code's `keep_hard`) first.
    `k` defaults to `default_clusters(N)`. Rows are normalised for the similarity (cosine), so any embedding works.
    The clustering only bounds which pairs are compared, so it is trained cheaply by default (`niter` 10 on at most
    `max_points_per_centroid` 64 sampled points per centroid).
    """
    check_embeddings(embeddings)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
        raise PrunekitError(f"SemDeDup threshold must be a cosine similarity in (0, 1), got {threshold!r}")
    if rule not in RULES:
        raise PrunekitError(f"SemDeDup rule {rule!r} is unknown; use one of {', '.join(RULES)}")
    if keep not in KEEP_ORDERS:
        raise PrunekitError(f"SemDeDup keep order {keep!r} is unknown; use one of {', '.join(KEEP_ORDERS)}")
    n = len(embeddings)
    k = default_clusters(n) if k is None else _check_k(k, n)
    for name, value in (("max_cluster_size", max_cluster_size), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrunekitError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
        raise PrunekitError(f"niter must be an integer >= 1, got {niter!r}")
    _, assignment, to_centroid = _kmeans(embeddings, k, seed=seed, niter=niter, spherical=True,
                                         max_points_per_centroid=max_points_per_centroid, threads=threads)
    # Farthest first = ascending cosine similarity to the centroid; the stable sort keeps ties in input order.
    sign = 1.0 if keep == "farthest" else -1.0
    upper = ~np.tri(min(block, n), k=-1, dtype=bool)
    groups = np.arange(n, dtype=np.int64)
    similarity = np.empty(n, dtype=np.float64)
    with _thread_limit(threads), tqdm(total=n, desc="semdedup", unit="ex", disable=not progress) as bar:
        for members in _clusters(embeddings, assignment, max_cluster_size, seed, niter):
            order = np.argsort(sign * to_centroid[members], kind="stable")
            x = _normalised(embeddings[members])[order]  # read in index order (memory maps), then reorder
            members = members[order]
            root, best = _dedup_cluster(x, float(threshold), rule, upper)
            groups[members] = members[root]
            similarity[members] = np.maximum(best, -1.0)  # -inf (nothing earlier) as the lowest cosine similarity
            bar.update(len(members))
    return SemDeDupResult(groups=groups, similarity=similarity, assignment=assignment, k=k, rule=rule, keep=keep)


def semdedup_groups(
    embeddings: np.ndarray, *, threshold: float, k: int | None = None, seed: int = 0, **options: object
) -> np.ndarray:
    """Group id per example (the input index of the kept example it leads back to); see `semdedup`."""
    return semdedup(embeddings, threshold=threshold, k=k, seed=seed, **options).groups
