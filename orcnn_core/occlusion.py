"""Occlusion graph and pick order from a :class:`~orcnn_core.predictor.Prediction`.

Pure numpy, no ROS: the perception node, ``orcnn-core predict`` and offline tools share it.

Edges. Instance A lies on instance B (edge ``A -> B``) when the part of B that is amodal but
hidden (label 2 in B's crop) and the visible part of A (label 1 in A's crop) share at least
``min_overlap_pixels`` pixels and at least ``min_overlap_ratio`` of B's amodal area. Only
pairs whose integer amodal boxes intersect are compared, on the intersection window of the
two crops, so nothing is pasted into full-frame masks. Visible pixels lie inside the image
by construction, so hidden parts outside the image (truncation) never make an edge.

Cycles. A model can predict A on B and B on A (two hidden regions under two visible ones),
or longer loops. While the graph has a cycle, the weakest edge that lies on a cycle (the
fewest overlap pixels; ties: smaller overlap ratio, then lower occluder index, then lower
occludee index) is dropped; it goes to ``dropped_edges`` and ``has_cycle`` is set. Edges
that lie on no cycle are never dropped.

Layers. On the remaining (acyclic) graph, ``layers[i]`` is 0 when nothing lies on instance
``i``, else one more than the largest layer of the instances on it: the length of the
longest chain of objects stacked above it.

Pick order. Instances sorted by ``(layer ascending, score descending, occlusion ratio
ascending, index ascending)``. Every edge goes from a lower to a higher layer, so this is a
topological order (Kahn's algorithm taken level by level): removing objects in this order
never removes an object while something still lies on it. All instances with nothing on
top come first, the most confident and least occluded of them first; the first entry is the
best object to pick now.
"""

import heapq
import math
from dataclasses import dataclass

import numpy as np

from orcnn_core.errors import InputError

__all__ = ["OcclusionGraph", "occlusion_graph", "pair_overlaps"]

VISIBLE, HIDDEN = 1, 2


@dataclass
class OcclusionGraph:
    """"Lies on" relations between the N instances of one prediction (see module doc).

    ``edges`` int64 [E, 2] (occluder, occludee) instance indices, kept edges only, sorted;
    ``overlap_pixels`` int64 [E]; ``overlap_ratio`` float32 [E] = overlap pixels / occludee
    amodal area; ``layers`` int64 [N]; ``pick_order`` int64 [N], a permutation of 0..N-1,
    first = best to pick now; ``has_cycle``: edges were dropped to break cycles;
    ``dropped_edges`` int64 [D, 2], in the order they were dropped.
    """

    edges: np.ndarray
    overlap_pixels: np.ndarray
    overlap_ratio: np.ndarray
    layers: np.ndarray
    pick_order: np.ndarray
    has_cycle: bool
    dropped_edges: np.ndarray

    def __len__(self) -> int:
        return int(self.layers.shape[0])

    def occluders_of(self, index: int) -> np.ndarray:
        """Indices of the instances that lie on instance ``index`` (kept edges)."""
        return self.edges[self.edges[:, 1] == index, 0]


def pair_overlaps(rois: np.ndarray, crops: list):
    """Overlap of each instance's visible part with every other instance's hidden part.

    Returns ``(pairs int64 [P, 2], pixels int64 [P])`` for the ordered pairs ``(a, b)``,
    ``a != b``, whose rois intersect and where a's visible pixels cover some of b's hidden
    pixels (``pixels > 0``).
    """
    rois = np.asarray(rois, np.int64).reshape(-1, 4)
    n = rois.shape[0]
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    x0, y0 = rois[:, 0], rois[:, 1]
    x1, y1 = x0 + rois[:, 2], y0 + rois[:, 3]
    # Intersection of every pair of boxes at once; only intersecting pairs are compared.
    ix0 = np.maximum(x0[:, None], x0[None, :])
    iy0 = np.maximum(y0[:, None], y0[None, :])
    ix1 = np.minimum(x1[:, None], x1[None, :])
    iy1 = np.minimum(y1[:, None], y1[None, :])
    a_idx, b_idx = np.nonzero(np.triu((ix1 > ix0) & (iy1 > iy0), k=1))
    visible = [c == VISIBLE for c in crops]
    hidden = [c == HIDDEN for c in crops]
    pairs, pixels = [], []
    for a, b in zip(a_idx.tolist(), b_idx.tolist()):
        wx0, wy0, wx1, wy1 = ix0[a, b], iy0[a, b], ix1[a, b], iy1[a, b]
        wa = (slice(wy0 - y0[a], wy1 - y0[a]), slice(wx0 - x0[a], wx1 - x0[a]))
        wb = (slice(wy0 - y0[b], wy1 - y0[b]), slice(wx0 - x0[b], wx1 - x0[b]))
        a_on_b = int(np.count_nonzero(visible[a][wa] & hidden[b][wb]))
        b_on_a = int(np.count_nonzero(visible[b][wb] & hidden[a][wa]))
        if a_on_b:
            pairs.append((a, b))
            pixels.append(a_on_b)
        if b_on_a:
            pairs.append((b, a))
            pixels.append(b_on_a)
    return np.asarray(pairs, np.int64).reshape(-1, 2), np.asarray(pixels, np.int64)


def _check_thresholds(min_overlap_pixels, min_overlap_ratio) -> None:
    if isinstance(min_overlap_pixels, bool) or not isinstance(
            min_overlap_pixels, (int, np.integer)) or min_overlap_pixels < 0:
        raise InputError(f"min_overlap_pixels must be an integer >= 0, got "
                         f"{min_overlap_pixels!r}")
    if isinstance(min_overlap_ratio, bool) or not isinstance(
            min_overlap_ratio, (int, float, np.floating)) \
            or not math.isfinite(min_overlap_ratio) or not 0.0 <= min_overlap_ratio <= 1.0:
        raise InputError(f"min_overlap_ratio must be in [0, 1], got {min_overlap_ratio!r}")


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


def _break_cycles(n: int, edges: list, pixels: list, ratios: list):
    """Drop the weakest edge lying on a cycle until none is left; returns (kept, dropped)
    as lists of positions into ``edges``."""
    alive = list(range(len(edges)))
    dropped = []
    while alive:
        comp = _cyclic_components(n, [edges[k] for k in alive])
        on_cycle = [k for k in alive if comp[edges[k][0]] == comp[edges[k][1]]]
        if not on_cycle:
            break
        weakest = min(on_cycle, key=lambda k: (pixels[k], ratios[k], edges[k]))
        alive.remove(weakest)
        dropped.append(weakest)
    return alive, dropped


def _layers(n: int, edges: np.ndarray) -> np.ndarray:
    """Longest chain of occluders above each node of a DAG (Kahn's algorithm)."""
    layers = np.zeros(n, np.int64)
    indegree = np.zeros(n, np.int64)
    succ = [[] for _ in range(n)]
    for a, b in edges.tolist():
        succ[a].append(b)
        indegree[b] += 1
    ready = [i for i in range(n) if indegree[i] == 0]
    heapq.heapify(ready)
    seen = 0
    while ready:
        v = heapq.heappop(ready)
        seen += 1
        for w in succ[v]:
            layers[w] = max(layers[w], layers[v] + 1)
            indegree[w] -= 1
            if indegree[w] == 0:
                heapq.heappush(ready, w)
    assert seen == n, "occlusion graph still has a cycle"
    return layers


def occlusion_graph(prediction, min_overlap_pixels: int = 20,
                    min_overlap_ratio: float = 0.01) -> OcclusionGraph:
    """The occlusion graph of ``prediction`` (a :class:`Prediction` or anything with
    ``rois``, ``crops``, ``scores``, ``amodal_areas`` and ``occlusion_ratios``).

    An edge needs at least one overlapping pixel even when both thresholds are 0.
    Raises :class:`InputError` for a negative pixel threshold or a ratio outside [0, 1].
    """
    _check_thresholds(min_overlap_pixels, min_overlap_ratio)
    n = len(prediction.crops)
    amodal = np.asarray(prediction.amodal_areas, np.int64).reshape(n)
    pairs, pixels = pair_overlaps(prediction.rois, prediction.crops)
    ratios = (pixels / np.maximum(amodal[pairs[:, 1]], 1)).astype(np.float32) if len(pairs) \
        else np.zeros(0, np.float32)
    keep = (pixels >= max(int(min_overlap_pixels), 1)) \
        & (ratios >= np.float32(min_overlap_ratio))
    pairs, pixels, ratios = pairs[keep], pixels[keep], ratios[keep]

    edge_list = [tuple(e) for e in pairs.tolist()]
    alive, dropped = _break_cycles(n, edge_list, pixels.tolist(), ratios.tolist())
    dropped_edges = pairs[dropped].reshape(-1, 2)
    kept = np.asarray(sorted(alive, key=lambda k: edge_list[k]), np.int64)
    edges = pairs[kept].reshape(-1, 2)
    layers = _layers(n, edges)

    scores = np.asarray(prediction.scores, np.float64).reshape(n)
    occlusion = np.asarray(prediction.occlusion_ratios, np.float64).reshape(n)
    # np.lexsort sorts by the last key first.
    pick_order = np.lexsort((np.arange(n), occlusion, -scores, layers)).astype(np.int64)
    return OcclusionGraph(
        edges=edges,
        overlap_pixels=pixels[kept].astype(np.int64),
        overlap_ratio=ratios[kept].astype(np.float32),
        layers=layers,
        pick_order=pick_order,
        has_cycle=bool(len(dropped)),
        dropped_edges=dropped_edges.astype(np.int64),
    )
