"""Occlusion graph, pick order and the confidence of both, from a :class:`Prediction`.

Pure numpy, no ROS: the perception node, ``orcnn-core predict`` / ``evaluate`` and offline
tools share :func:`occlusion_graph`, so the evaluator scores exactly what the node publishes.

Evidence. Instance A lies on instance B when A's visible part covers B's hidden part (amodal
but not visible). The evidence e(A, B) is the sum over the pixels both rois share of
visible_A * hidden_B: with label crops the overlap pixel count, with the Predictor's mask
probabilities (``prediction.probs``) p_visible(A) * p_amodal(B) * (1 - p_visible(B)), which
keeps the evidence of pairs whose thresholded masks do not quite meet. Only pairs whose
integer amodal boxes intersect are compared, on the intersection window of the two crops,
so nothing is pasted into full-frame masks. Visible pixels lie inside the image, so hidden
parts outside the image (truncation) never make an edge.

Confidence. P(A lies on B) = e(A, B) / (e(A, B) + e(B, A) + PRIOR_PIXELS)
(:func:`edge_confidence`). An edge A -> B is kept when e(A, B) >= ``min_overlap_pixels``,
e(A, B) / amodal area of B >= ``min_overlap_ratio`` and its confidence >=
``min_confidence``. With a model that has an order head (``prediction.order``), P(A lies
on B) is the head's probability instead, for every pair whose boxes overlap; the pixel
evidence is still reported and thresholded. The defaults were tuned on held-out synthetic
scenes of a validation seed (docs/evaluation.md). ``free_probability[i]`` = product over all j of
(1 - P(j lies on i)): the probability that nothing lies on instance i.

Cycles. A model can predict A on B and B on A, or longer loops. While the graph has a
cycle, the weakest edge that lies on a cycle (lowest confidence; ties: less evidence, then
lower occluder index, then lower occludee index) is dropped; it goes to ``dropped_edges``
and ``has_cycle`` is set. Edges that lie on no cycle are never dropped.

Layers. On the remaining (acyclic) graph, ``layers[i]`` is 0 when nothing lies on instance
``i``, else one more than the largest layer of the instances on it: the length of the
longest chain of objects stacked above it.

Pick order. A topological order of the kept edges that takes, among the instances with
nothing left on them, the most likely free first (ties: higher score, then lower index),
each pick removed before the next (its evidence on the others no longer counts): the first
entry is the object most likely to be pickable now, and removing objects in this order
never removes one while the graph says that something still lies on it.
"""

import heapq
import math
from dataclasses import dataclass

import numpy as np

from orcnn_core.errors import InputError

try:  # einsum without its Python dispatch layer (1 us a call, most of a small window's cost)
    from numpy._core.multiarray import c_einsum as _einsum
except ImportError:  # another numpy layout: the public function, same results
    _einsum = np.einsum

from orcnn_core.prediction import HIDDEN, VISIBLE

__all__ = ["OcclusionGraph", "occlusion_graph", "pair_evidence", "pair_overlaps",
           "edge_confidence", "pick_ranks", "MIN_OVERLAP_PIXELS", "MIN_OVERLAP_RATIO",
           "MIN_CONFIDENCE", "PRIOR_PIXELS"]

#: Default edge thresholds and confidence prior (see the module doc; tuned on a validation
#: seed of synthetic scenes with the bundled model, docs/evaluation.md).
MIN_OVERLAP_PIXELS = 1.0
MIN_OVERLAP_RATIO = 0.0
MIN_CONFIDENCE = 0.5
PRIOR_PIXELS = 2.0


@dataclass
class OcclusionGraph:
    """"Lies on" relations between the N instances of one prediction (see module doc).

    ``edges`` int64 [E, 2] (occluder, occludee) instance indices, kept edges only, sorted;
    ``overlap_pixels`` int64 [E], the evidence rounded (the overlap pixel count for labels);
    ``overlap_ratio`` float32 [E] = evidence / occludee amodal area; ``confidence``
    float32 [E] = P(occluder lies on occludee); ``layers`` int64 [N]; ``free_probability``
    float32 [N] = P(nothing lies on the instance); ``pick_order`` int64 [N], a permutation
    of 0..N-1, first = best to pick now; ``has_cycle``: edges were dropped to break cycles;
    ``dropped_edges`` int64 [D, 2], in the order they were dropped.
    """

    edges: np.ndarray
    overlap_pixels: np.ndarray
    overlap_ratio: np.ndarray
    confidence: np.ndarray
    layers: np.ndarray
    free_probability: np.ndarray
    pick_order: np.ndarray
    has_cycle: bool
    dropped_edges: np.ndarray

    def __len__(self) -> int:
        return int(self.layers.shape[0])


def _planes(crops: list, probs=None) -> np.ndarray:
    """The evidence planes of all instances in one float64 array [2, sum of roi areas]:
    row 0 visible, row 1 hidden, each instance's roi flattened, in instance order.

    From label crops: 1 where the label is visible (resp. hidden), else 0. From probability
    crops (uint8 [2, h, w], amodal and visible, 255 = 1): p_visible and
    p_amodal * (1 - p_visible), computed in float32 and held in float64, so that every
    product of two planes is exact. One conversion for all instances: per-instance array
    operations cost more than their pixels here.
    """
    if probs is None:
        labels = np.concatenate([np.asarray(c).reshape(-1) for c in crops])
        planes = np.empty((2, labels.size), np.float64)
        np.equal(labels, VISIBLE, out=planes[0], casting="unsafe")
        np.equal(labels, HIDDEN, out=planes[1], casting="unsafe")
        return planes
    # uint8 [2, total]: amodal, visible. In float32, the amodal row becomes the hidden one.
    planes = np.concatenate([np.asarray(p).reshape(2, -1) for p in probs], 1).astype(
        np.float32)
    planes *= np.float32(1 / 255)
    planes[0] *= 1 - planes[1]
    return planes[::-1].astype(np.float64)


def _check_crops(rois: np.ndarray, crops: list, probs) -> None:
    n = rois.shape[0]
    if len(crops) != n:
        raise InputError(f"crops: {len(crops)} crops for {n} rois")
    shapes = [np.shape(c) for c in crops]
    expected = list(zip(rois[:, 3].tolist(), rois[:, 2].tolist()))
    if shapes != expected:
        i = next(i for i, s in enumerate(shapes) if s != expected[i])
        raise InputError(f"crops[{i}]: shape {shapes[i]} is not the roi's height x width "
                         f"{expected[i][0]} x {expected[i][1]}")
    if probs is not None:
        if len(probs) != n:
            raise InputError(f"probs: {len(probs)} probability crops for {n} rois")
        bad = [i for i, p in enumerate(probs) if np.asarray(p).dtype != np.uint8]
        if bad:
            raise InputError(f"probs[{bad[0]}]: dtype {np.asarray(probs[bad[0]]).dtype}, "
                             f"expected uint8 (probability x 255)")
        bad = [i for i, p in enumerate(probs) if np.shape(p) != (2,) + expected[i]]
        if bad:
            raise InputError(f"probs[{bad[0]}]: shape {np.shape(probs[bad[0]])} is not 2 x "
                             f"the roi's height x width {expected[bad[0]]}")


def pair_evidence(rois: np.ndarray, crops: list, probs=None):
    """Evidence that each instance lies on each other one: how much of b's hidden part a's
    visible part covers.

    ``rois`` int [N, 4] ``(x, y, width, height)``; ``crops`` N label arrays [height, width]
    (1 visible, 2 hidden, other values background); ``probs`` optional N uint8 arrays
    [2, height, width] of amodal and visible probabilities (255 = 1). Returns
    ``(pairs int64 [P, 2], evidence float64 [P])`` for the ordered pairs ``(a, b)``,
    ``a != b``, whose rois intersect and whose evidence is positive: for the intersecting
    pairs ``a < b`` in row-major order, ``(a, b)`` then ``(b, a)``. Evidence is the sum over
    the shared pixels of visible_a * hidden_b (:func:`_planes`): the overlap pixel count for
    labels, the expected overlap under the probabilities for ``probs``. Raises
    :class:`InputError` when a crop's shape is not its roi's.

    Each window is a view of both instances' planes: one numpy call per pair for both
    directions, no gathered copies; the products are exact and sum in float64.
    """
    rois = np.asarray(rois, np.int64).reshape(-1, 4)
    _check_crops(rois, crops, probs)
    if rois.shape[0] < 2:
        return _no_pairs()
    a, b, windows = _intersecting_pairs(rois)
    if not a.size:
        return _no_pairs()
    sums = _window_sums(rois, _planes(crops, probs), a, b, windows)
    # (a, b) then (b, a) for every pair.
    pairs = np.empty((a.size, 2, 2), np.int64)
    pairs[:, 0, 0] = pairs[:, 1, 1] = a
    pairs[:, 0, 1] = pairs[:, 1, 0] = b
    evidence = sums.reshape(-1)
    keep = evidence > 0
    return pairs.reshape(-1, 2)[keep], evidence[keep]


def pair_overlaps(rois: np.ndarray, crops: list):
    """:func:`pair_evidence` of label crops: ``(pairs int64 [P, 2], pixels int64 [P])``, the
    number of b's hidden pixels that a's visible pixels cover."""
    pairs, evidence = pair_evidence(rois, crops)
    return pairs, np.rint(evidence).astype(np.int64)


def _intersecting_pairs(rois: np.ndarray):
    """Pairs ``a < b`` (row-major) whose rois intersect, and their intersection windows
    ``(x, y, width, height)``, each int64 [P]."""
    x0, y0, width, height = rois.T
    x1, y1 = x0 + width, y0 + height
    # Intersection of every pair of boxes at once.
    ix0 = np.maximum(x0[:, None], x0[None, :])
    iy0 = np.maximum(y0[:, None], y0[None, :])
    ix1 = np.minimum(x1[:, None], x1[None, :])
    iy1 = np.minimum(y1[:, None], y1[None, :])
    a, b = np.nonzero((ix1 > ix0) & (iy1 > iy0))
    upper = a < b
    a, b = a[upper], b[upper]
    wx0, wy0 = ix0[a, b], iy0[a, b]
    return a, b, (wx0, wy0, ix1[a, b] - wx0, iy1[a, b] - wy0)


def _window_sums(rois, planes, a, b, windows):
    """float64 [P, 2]: per window, (sum visible_a * hidden_b, sum visible_b * hidden_a), from
    the planes of :func:`_planes`.

    Instance i's planes are a [2, height, width] view, a window a view of that, and b's
    planes in reverse order pair a's visible with b's hidden and a's hidden with b's
    visible: one product-and-sum gives both directions.
    """
    x0, y0, width, height = (c.tolist() for c in rois.T)
    starts = np.cumsum([0] + [w * h for w, h in zip(width, height)]).tolist()
    views = [planes[:, starts[k]:starts[k + 1]].reshape(2, height[k], width[k])
             for k in range(len(x0))]
    sums = []
    for i, j, x, y, w, h in zip(a.tolist(), b.tolist(), *(c.tolist() for c in windows)):
        yi, xi, yj, xj = y - y0[i], x - x0[i], y - y0[j], x - x0[j]
        sums.append(_einsum("cyx,cyx->c", views[i][:, yi:yi + h, xi:xi + w],
                            views[j][::-1, yj:yj + h, xj:xj + w]))
    return np.asarray(sums, np.float64).reshape(-1, 2)


def _no_pairs():
    return np.zeros((0, 2), np.int64), np.zeros(0, np.float64)


def _check_thresholds(min_overlap_pixels, min_overlap_ratio, min_confidence,
                      prior_pixels) -> None:
    for name, value, high in (("min_overlap_pixels", min_overlap_pixels, math.inf),
                              ("min_overlap_ratio", min_overlap_ratio, 1.0),
                              ("min_confidence", min_confidence, 1.0),
                              ("prior_pixels", prior_pixels, math.inf)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                             np.floating)) \
                or math.isnan(value) or not 0.0 <= value <= high or value == math.inf:
            where = "[0, 1]" if high == 1.0 else "a finite number >= 0"
            raise InputError(f"{name} must be {where}, got {value!r}")


def _cyclic_components(n: int, edges: list) -> np.ndarray:
    """Strongly connected component id of each node (Tarjan's algorithm, iterative)."""
    succ = [[] for _ in range(n)]
    for a, b in edges:
        succ[a].append(b)
    index = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    comp = np.full(n, -1, np.int64)
    stack, counter, n_comp = [], 0, 0
    for root in range(n):
        if index[root] != -1:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if index[w] == -1:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp[w] = n_comp
                    if w == v:
                        break
                n_comp += 1
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return comp


def _break_cycles(n: int, edges: list, confidence: list, evidence: list):
    """Drop the weakest edge lying on a cycle until none is left; returns (kept, dropped)
    as lists of positions into ``edges``, dropped in the order they were dropped.

    One pass instead of finding the cycles again after every drop: removing an edge never
    puts another edge on a cycle, so the edges on a cycle at the start, visited weakest
    first, are exactly the candidates, and each is dropped when it still lies on a cycle
    (its occludee still reaches its occluder). A path from an edge's occludee back to its
    occluder stays inside their strongly connected component, so only the candidates are
    searched.
    """
    comp = _cyclic_components(n, edges).tolist()
    on_cycle = sorted((k for k, (a, b) in enumerate(edges) if comp[a] == comp[b]),
                      key=lambda k: (confidence[k], evidence[k], edges[k]))
    if not on_cycle:
        return list(range(len(edges))), []
    succ = [0] * n  # successors inside the component, as bit sets
    for k in on_cycle:
        a, b = edges[k]
        succ[a] |= 1 << b
    dropped = []
    for k in on_cycle:
        a, b = edges[k]
        if _reaches(succ, b, a):
            succ[a] &= ~(1 << b)
            dropped.append(k)
    gone = set(dropped)
    return [k for k in range(len(edges)) if k not in gone], dropped


def _reaches(succ: list, start: int, goal: int) -> bool:
    """Whether a path leads from ``start`` to ``goal`` (``succ``: successors as bit sets,
    bit w of ``succ[v]`` set for an edge v -> w). Breadth first, one level at a time."""
    seen = 1 << start
    level = succ[start]
    while level:
        if level >> goal & 1:
            return True
        seen |= level
        following = 0
        while level:
            lowest = level & -level
            following |= succ[lowest.bit_length() - 1]
            level ^= lowest
        level = following & ~seen
    return False


def _layers(n: int, edges: list):
    """Longest chain of occluders above each node (Kahn's algorithm): int64 [n], or None
    when the graph has a cycle."""
    layers = [0] * n
    indegree = [0] * n
    succ = [[] for _ in range(n)]
    for a, b in edges:
        succ[a].append(b)
        indegree[b] += 1
    ready = [i for i in range(n) if indegree[i] == 0]
    seen = 0
    while ready:
        v = ready.pop()
        seen += 1
        for w in succ[v]:
            layers[w] = max(layers[w], layers[v] + 1)
            indegree[w] -= 1
            if indegree[w] == 0:
                ready.append(w)
    return np.asarray(layers, np.int64) if seen == n else None


def edge_confidence(evidence_ab, evidence_ba, prior_pixels: float = PRIOR_PIXELS):
    """Probability that a lies on b from the evidence both ways (:func:`pair_evidence`):
    ``e_ab / (e_ab + e_ba + prior_pixels)``. The prior keeps a few stray pixels from making
    a confident edge, and a pair with evidence both ways from deciding firmly."""
    evidence_ab = np.asarray(evidence_ab, np.float64)
    total = evidence_ab + np.asarray(evidence_ba, np.float64) + prior_pixels
    return np.divide(evidence_ab, total, out=np.zeros_like(total), where=total > 0)


def occlusion_graph(prediction, min_overlap_pixels: float = MIN_OVERLAP_PIXELS,
                    min_overlap_ratio: float = MIN_OVERLAP_RATIO,
                    min_confidence: float = MIN_CONFIDENCE,
                    prior_pixels: float = PRIOR_PIXELS) -> OcclusionGraph:
    """The occlusion graph and pick order of ``prediction`` (a :class:`Prediction`, or
    anything with ``rois``, ``crops``, ``scores``, ``amodal_areas`` and, optionally,
    ``probs``).

    The order is decided on the order head's probabilities when the prediction has them
    (``order``), else on the mask probabilities (``probs``), else on its labels (see the
    module doc). From the masks, an edge needs positive evidence even when every threshold
    is 0; from the order head, ``min_overlap_pixels`` 0 lets the head's probability alone
    make an edge. Raises :class:`InputError` for a threshold out of range.
    """
    _check_thresholds(min_overlap_pixels, min_overlap_ratio, min_confidence, prior_pixels)
    n = len(prediction.crops)
    pairs, evidence = pair_evidence(prediction.rois, prediction.crops,
                                    getattr(prediction, "probs", None))
    order = getattr(prediction, "order", None)
    if order is None:
        confidence = edge_confidence(evidence, _reverse_lookup(pairs, evidence, n),
                                     prior_pixels)
    else:
        pairs, evidence, confidence = _head_pairs(np.asarray(order, np.float64), pairs,
                                                  evidence, n)
    amodal = np.asarray(prediction.amodal_areas, np.int64).reshape(n)
    ratios = (evidence / np.maximum(amodal[pairs[:, 1]], 1)).astype(np.float32)
    terms = _occluder_terms(n, pairs, confidence)
    keep = (evidence >= min_overlap_pixels) & (ratios >= np.float32(min_overlap_ratio)) \
        & (confidence >= min_confidence)
    pairs, evidence, ratios, confidence = (pairs[keep], evidence[keep], ratios[keep],
                                           confidence[keep])
    edge_list = [tuple(e) for e in pairs.tolist()]
    layers = _layers(n, edge_list)  # the cycle search only when there is a cycle
    if layers is None:
        alive, dropped = _break_cycles(n, edge_list, confidence.tolist(), evidence.tolist())
        layers = _layers(n, [edge_list[k] for k in alive])
    else:
        alive, dropped = range(len(edge_list)), []
    kept = np.asarray(sorted(alive, key=lambda k: edge_list[k]), np.int64)
    edges = pairs[kept].reshape(-1, 2)
    scores = np.asarray(prediction.scores, np.float64).reshape(n)
    return OcclusionGraph(
        edges=edges,
        overlap_pixels=np.rint(evidence[kept]).astype(np.int64),
        overlap_ratio=ratios[kept].astype(np.float32),
        confidence=confidence[kept].astype(np.float32),
        layers=layers,
        free_probability=np.exp([math.fsum(t.values()) for t in terms]).astype(np.float32),
        pick_order=_pick_order(n, edges, terms, scores),
        has_cycle=bool(len(dropped)),
        dropped_edges=pairs[dropped].reshape(-1, 2).astype(np.int64),
    )


def _head_pairs(order: np.ndarray, pairs: np.ndarray, evidence: np.ndarray, n: int):
    """(pairs, evidence, confidence) with the order head's probabilities as confidence:
    every ordered pair the head scored (its boxes overlap), with the pixel evidence of the
    masks where they have some (else 0)."""
    if order.shape != (n, n) or not np.isfinite(order).all():
        raise InputError(f"order must be a finite {n} x {n} matrix, got {order.shape}")
    table = np.zeros((n, n), np.float64)
    table[pairs[:, 0], pairs[:, 1]] = evidence
    a, b = np.nonzero(order > 0)
    return np.stack([a, b], 1).astype(np.int64), table[a, b], np.clip(order[a, b], 0, 1)


def _reverse_lookup(pairs: np.ndarray, evidence: np.ndarray, n: int) -> np.ndarray:
    """For each pair (a, b), the evidence of (b, a) (0 when it has none)."""
    table = np.zeros((n, n), np.float64)
    table[pairs[:, 0], pairs[:, 1]] = evidence
    return table[pairs[:, 1], pairs[:, 0]]


def _occluder_terms(n: int, pairs: np.ndarray, confidence: np.ndarray) -> list:
    """Per instance j, {i: log(1 - P(i lies on j))} over the instances with evidence on it.
    The log of the probability that nothing lies on j is the sum of its terms (the pairs
    taken as independent), computed with math.fsum: exact, so equal sets of terms give
    equal sums and ties break by score, not by rounding."""
    terms = [{} for _ in range(n)]
    log_keep = np.log1p(-np.minimum(confidence, 1 - 1e-12))
    for (i, j), term in zip(pairs.tolist(), log_keep.tolist()):
        terms[j][i] = term
    return terms


def _pick_order(n: int, edges: np.ndarray, terms: list, scores: np.ndarray) -> np.ndarray:
    """int64 [n]: a topological order of the (acyclic) kept ``edges`` that takes, among the
    instances with nothing left on them, the most likely free first (ties: higher score,
    then lower index), each pick removed before the next: its evidence on the others no
    longer counts against them. Removing objects in this order never removes one while the
    graph says that something still lies on it."""
    # Plain Python lists and numbers: numpy element access costs more than the work here.
    terms = [dict(t) for t in terms]
    indegree = [0] * n
    succ = [[] for _ in range(n)]
    for a, b in edges.tolist():
        succ[a].append(b)
        indegree[b] += 1
    lies_on = [[] for _ in range(n)]
    for j, t in enumerate(terms):
        for i in t:
            lies_on[i].append(j)
    version = [0] * n
    neg_scores = [-s for s in scores.tolist()]

    def key(j):
        return (-math.fsum(terms[j].values()), neg_scores[j], j, version[j])

    ready = [key(i) for i in range(n) if indegree[i] == 0]
    heapq.heapify(ready)
    order, picked = [], [False] * n
    while ready:
        i, seen = heapq.heappop(ready)[2:]
        if picked[i] or seen != version[i]:
            continue  # picked already, or its key changed since it was pushed
        order.append(i)
        picked[i] = True
        for j in lies_on[i]:
            if not picked[j]:
                del terms[j][i]
                version[j] += 1
                if indegree[j] == 0:
                    heapq.heappush(ready, key(j))
        for j in succ[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(ready, key(j))
    return np.asarray(order, np.int64)


def pick_ranks(graph: OcclusionGraph) -> np.ndarray:
    """int64 [N]: each instance's place in ``graph.pick_order`` (0 = pick first); raises
    :class:`InputError` when the pick order is not a permutation of the instances."""
    n = len(graph)
    order = np.asarray(graph.pick_order, np.int64).reshape(-1)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise InputError(f"pick_order must be a permutation of the {n} instances, got "
                         f"{order.tolist()}")
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n)
    return ranks
