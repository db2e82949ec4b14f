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


#: Intersection windows up to this many pixels are compared together, by gathering their
#: pixels (no Python loop over pairs); larger ones one by one on views of the crops, where
#: the pixel work outweighs the loop.
LOOP_PIXELS = 1500
#: Window pixels gathered in one batch: bounds the temporary index arrays (8 bytes per pixel
#: each) when many boxes overlap.
BATCH_PIXELS = 1 << 20


def _planes(crops: list, probs=None) -> tuple:
    """Per instance, flat float32 evidence planes over its roi: (visible, hidden).

    From label crops: 1 where the label is visible (resp. hidden), else 0. From probability
    crops (uint8 [2, h, w], amodal and visible, 255 = 1): p_visible and
    p_amodal * (1 - p_visible).
    """
    if probs is None:
        visible = [(np.asarray(c) == VISIBLE).astype(np.float32).reshape(-1) for c in crops]
        hidden = [(np.asarray(c) == HIDDEN).astype(np.float32).reshape(-1) for c in crops]
        return visible, hidden
    visible, hidden = [], []
    for p in probs:
        p = np.asarray(p, np.float32).reshape(2, -1) * np.float32(1 / 255)
        visible.append(p[1])
        hidden.append(p[0] * (1 - p[1]))
    return visible, hidden


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

    Small intersection windows are compared together (numpy gathers over their pixels,
    :data:`BATCH_PIXELS` at a time), windows above :data:`LOOP_PIXELS` one by one.
    """
    rois = np.asarray(rois, np.int64).reshape(-1, 4)
    _check_crops(rois, crops, probs)
    if rois.shape[0] < 2:
        return _no_pairs()
    a, b, windows = _intersecting_pairs(rois)
    if not a.size:
        return _no_pairs()
    visible, hidden = _planes(crops, probs)
    sums = _window_sums(rois, visible, hidden, a, b, windows)
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


def _window_sums(rois, visible, hidden, a, b, windows):
    """float64 [P, 2]: per window, (sum visible_a * hidden_b, sum visible_b * hidden_a)."""
    x0, y0, width, height = rois.T
    wx0, wy0, win_w, win_h = windows
    flat_visible, flat_hidden = np.concatenate(visible), np.concatenate(hidden)
    sizes = width * height
    offsets = np.cumsum(sizes) - sizes
    # Flat position of each window's top-left pixel in a's crop and in b's crop.
    corner_a = offsets[a] + (wy0 - y0[a]) * width[a] + (wx0 - x0[a])
    corner_b = offsets[b] + (wy0 - y0[b]) * width[b] + (wx0 - x0[b])
    area = win_w * win_h
    sums = np.empty((a.size, 2), np.float64)
    small = np.flatnonzero(area <= LOOP_PIXELS)
    if small.size:
        batch = np.cumsum(area[small]) // BATCH_PIXELS
        for part in np.split(small, np.flatnonzero(np.diff(batch)) + 1):
            sums[part] = _gathered_sums(flat_visible, flat_hidden, corner_a[part],
                                        width[a[part]], corner_b[part], width[b[part]],
                                        win_w[part], win_h[part])
    for k in np.flatnonzero(area > LOOP_PIXELS).tolist():
        i, j = int(a[k]), int(b[k])
        in_i = _window_slices(rois[i], wx0[k], wy0[k], win_w[k], win_h[k])
        in_j = _window_slices(rois[j], wx0[k], wy0[k], win_w[k], win_h[k])
        shape_i, shape_j = (height[i], width[i]), (height[j], width[j])
        vis_i, hid_i = visible[i].reshape(shape_i)[in_i], hidden[i].reshape(shape_i)[in_i]
        vis_j, hid_j = visible[j].reshape(shape_j)[in_j], hidden[j].reshape(shape_j)[in_j]
        # float64 sums, as in the gathered path: a threshold must not depend on the window.
        sums[k] = (np.vdot(vis_i.astype(np.float64), hid_j),
                   np.vdot(vis_j.astype(np.float64), hid_i))
    return sums


def _window_slices(roi, x, y, w, h) -> tuple:
    """The slices of a ``h x w`` window at image position ``(x, y)`` in the crop of ``roi``."""
    return (slice(y - roi[1], y - roi[1] + h), slice(x - roi[0], x - roi[0] + w))


def _no_pairs():
    return np.zeros((0, 2), np.int64), np.zeros(0, np.float64)


def _gathered_sums(flat_visible, flat_hidden, corner_a, width_a, corner_b, width_b, win_w,
                   win_h):
    """:func:`_window_sums` of W small windows together: window k is ``win_h[k] x
    win_w[k]`` at flat position ``corner_a[k]`` of a crop ``width_a[k]`` wide and at
    ``corner_b[k]`` of one ``width_b[k]`` wide (all int64 [W]). Returns float64 [W, 2]."""
    # One entry per window row: where the row starts in both crops and in the output.
    row_window = np.repeat(np.arange(win_h.size), win_h)
    first_row = np.cumsum(win_h) - win_h
    row = np.arange(row_window.size) - first_row[row_window]
    row_len = win_w[row_window]
    out_start = np.cumsum(row_len) - row_len
    shift_a = corner_a[row_window] + row * width_a[row_window] - out_start
    shift_b = corner_b[row_window] + row * width_b[row_window] - out_start
    out = np.arange(int(out_start[-1] + row_len[-1]))
    at_a = out + np.repeat(shift_a, row_len)
    at_b = out + np.repeat(shift_b, row_len)
    window_start = np.cumsum(win_w * win_h) - win_w * win_h
    a_on_b = flat_visible[at_a] * flat_hidden[at_b]
    b_on_a = flat_visible[at_b] * flat_hidden[at_a]
    return np.stack([np.add.reduceat(a_on_b, window_start, dtype=np.float64),
                     np.add.reduceat(b_on_a, window_start, dtype=np.float64)], 1)


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
    (its occludee still reaches its occluder).
    """
    comp = _cyclic_components(n, edges)
    on_cycle = sorted((k for k, (a, b) in enumerate(edges) if comp[a] == comp[b]),
                      key=lambda k: (confidence[k], evidence[k], edges[k]))
    if not on_cycle:
        return list(range(len(edges))), []
    succ = [set() for _ in range(n)]
    for a, b in edges:
        succ[a].add(b)
    dropped = []
    for k in on_cycle:
        a, b = edges[k]
        if _reaches(succ, b, a):
            succ[a].discard(b)
            dropped.append(k)
    gone = set(dropped)
    return [k for k in range(len(edges)) if k not in gone], dropped


def _reaches(succ: list, start: int, goal: int) -> bool:
    """Whether a path leads from ``start`` to ``goal`` (``succ``: successor sets)."""
    seen = {start}
    todo = [start]
    while todo:
        for w in succ[todo.pop()]:
            if w == goal:
                return True
            if w not in seen:
                seen.add(w)
                todo.append(w)
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
    module doc). An edge needs positive evidence even when every
    threshold is 0. Raises :class:`InputError` for a threshold out of range.
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
    terms = [dict(t) for t in terms]
    indegree = np.bincount(edges[:, 1], minlength=n) if len(edges) else np.zeros(n, np.int64)
    succ = [[] for _ in range(n)]
    for a, b in edges.tolist():
        succ[a].append(b)
    lies_on = [[] for _ in range(n)]
    for j, t in enumerate(terms):
        for i in t:
            lies_on[i].append(j)
    version = [0] * n

    def key(j):
        return (-math.fsum(terms[j].values()), -float(scores[j]), j, version[j])

    ready = [key(i) for i in range(n) if indegree[i] == 0]
    heapq.heapify(ready)
    order, picked = [], np.zeros(n, bool)
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
