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


#: Intersection windows up to this many pixels are compared together, by gathering their
#: pixels (no Python loop over pairs); larger ones one by one on views of the crops, where
#: the pixel work outweighs the loop.
LOOP_PIXELS = 1500
#: Window pixels gathered in one batch: bounds the temporary index arrays (8 bytes per pixel
#: each) when many boxes overlap.
BATCH_PIXELS = 1 << 20


def pair_overlaps(rois: np.ndarray, crops: list):
    """Overlap of each instance's visible part with every other instance's hidden part.

    ``rois`` int [N, 4] ``(x, y, width, height)``; ``crops`` N arrays [height, width] with
    1 visible, 2 hidden (other values count as background). Returns
    ``(pairs int64 [P, 2], pixels int64 [P])`` for the ordered pairs ``(a, b)``, ``a != b``,
    whose rois intersect and where a's visible pixels cover some of b's hidden pixels
    (``pixels > 0``): for the intersecting pairs ``a < b`` in row-major order, ``(a, b)``
    then ``(b, a)``. Raises :class:`InputError` when a crop's shape is not its roi's.

    Small intersection windows are compared together (numpy gathers over their pixels,
    :data:`BATCH_PIXELS` at a time), windows above :data:`LOOP_PIXELS` one by one.
    """
    rois = np.asarray(rois, np.int64).reshape(-1, 4)
    n = rois.shape[0]
    if len(crops) != n:
        raise InputError(f"crops: {len(crops)} crops for {n} rois")
    crops = [np.asarray(c) for c in crops]
    x0, y0, width, height = rois.T
    shapes = [c.shape for c in crops]
    if shapes != list(zip(height.tolist(), width.tolist())):
        i = next(i for i, s in enumerate(shapes) if s != (height[i], width[i]))
        raise InputError(f"crops[{i}]: shape {shapes[i]} is not the roi's height x width "
                         f"{height[i]} x {width[i]}")
    if n < 2:
        return _no_pairs()
    x1, y1 = x0 + width, y0 + height
    # Intersection of every pair of boxes at once; only intersecting pairs are compared.
    ix0 = np.maximum(x0[:, None], x0[None, :])
    iy0 = np.maximum(y0[:, None], y0[None, :])
    ix1 = np.minimum(x1[:, None], x1[None, :])
    iy1 = np.minimum(y1[:, None], y1[None, :])
    a, b = np.nonzero((ix1 > ix0) & (iy1 > iy0))
    upper = a < b
    a, b = a[upper], b[upper]
    if not a.size:
        return _no_pairs()
    wx0, wy0 = ix0[a, b], iy0[a, b]
    win_w, win_h = ix1[a, b] - wx0, iy1[a, b] - wy0
    # Every crop in one flat array of labels: 1 visible, 2 hidden, 0 anything else.
    labels = np.concatenate([c.reshape(-1) for c in crops])
    if labels.dtype != np.uint8 or labels.max() > HIDDEN:
        labels = np.where(labels == VISIBLE, VISIBLE,
                          np.where(labels == HIDDEN, HIDDEN, 0)).astype(np.uint8)
    sizes = width * height
    offsets = np.cumsum(sizes) - sizes
    # Flat position of each window's top-left pixel in a's crop and in b's crop.
    corner_a = offsets[a] + (wy0 - y0[a]) * width[a] + (wx0 - x0[a])
    corner_b = offsets[b] + (wy0 - y0[b]) * width[b] + (wx0 - x0[b])
    area = win_w * win_h
    counts = np.empty((a.size, 2), np.int64)
    small = np.flatnonzero(area <= LOOP_PIXELS)
    if small.size:
        batch = np.cumsum(area[small]) // BATCH_PIXELS
        for part in np.split(small, np.flatnonzero(np.diff(batch)) + 1):
            counts[part] = _window_overlaps(labels, corner_a[part], width[a[part]],
                                            corner_b[part], width[b[part]],
                                            win_w[part], win_h[part])
    large = np.flatnonzero(area > LOOP_PIXELS)
    if large.size:
        counts[large] = _sliced_overlaps(crops, x0.tolist(), y0.tolist(), a[large], b[large],
                                         wx0[large], wy0[large], win_w[large], win_h[large])
    # (a, b) then (b, a) for every pair.
    pairs = np.empty((a.size, 2, 2), np.int64)
    pairs[:, 0, 0] = pairs[:, 1, 1] = a
    pairs[:, 0, 1] = pairs[:, 1, 0] = b
    pixels = counts.reshape(-1)
    keep = pixels > 0
    return pairs.reshape(-1, 2)[keep], pixels[keep]


def _no_pairs():
    return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)


def _window_overlaps(labels, corner_a, width_a, corner_b, width_b, win_w, win_h):
    """Overlap counts in W windows, each a ``win_h x win_w`` region at flat position
    ``corner_a`` of a crop ``width_a`` wide and at ``corner_b`` of one ``width_b`` wide
    (all int64 [W]; ``labels`` the flat crops). Returns int64 [W, 2]: (a's visible on b's
    hidden, b's visible on a's hidden)."""
    # One entry per window row: where the row starts in both crops and in the output.
    row_window = np.repeat(np.arange(win_h.size), win_h)
    first_row = np.cumsum(win_h) - win_h
    row = np.arange(row_window.size) - first_row[row_window]
    row_len = win_w[row_window]
    out_start = np.cumsum(row_len) - row_len
    shift_a = corner_a[row_window] + row * width_a[row_window] - out_start
    shift_b = corner_b[row_window] + row * width_b[row_window] - out_start
    out = np.arange(int(out_start[-1] + row_len[-1]))
    code = labels[out + np.repeat(shift_a, row_len)] * np.uint8(3) \
        + labels[out + np.repeat(shift_b, row_len)]
    window_start = np.cumsum(win_w * win_h) - win_w * win_h
    return np.stack([np.add.reduceat(code == 3 * VISIBLE + HIDDEN, window_start, dtype=np.int64),
                     np.add.reduceat(code == 3 * HIDDEN + VISIBLE, window_start, dtype=np.int64)],
                    1)


def _sliced_overlaps(crops, x0, y0, a, b, wx0, wy0, win_w, win_h):
    """Overlap counts in W windows one by one: window k is ``win_h[k] x win_w[k]`` at image
    position ``(wx0[k], wy0[k])`` in crops ``a[k]`` and ``b[k]`` (``x0``, ``y0``: the rois'
    corners). Returns int64 [W, 2] like :func:`_window_overlaps`."""
    visible, hidden = {}, {}
    counts = np.empty((len(a), 2), np.int64)
    for k, (i, j, x, y, w, h) in enumerate(zip(a.tolist(), b.tolist(), wx0.tolist(),
                                               wy0.tolist(), win_w.tolist(), win_h.tolist())):
        for m in (i, j):
            if m not in visible:
                visible[m], hidden[m] = crops[m] == VISIBLE, crops[m] == HIDDEN
        in_i = (slice(y - y0[i], y - y0[i] + h), slice(x - x0[i], x - x0[i] + w))
        in_j = (slice(y - y0[j], y - y0[j] + h), slice(x - x0[j], x - x0[j] + w))
        counts[k, 0] = np.count_nonzero(visible[i][in_i] & hidden[j][in_j])
        counts[k, 1] = np.count_nonzero(visible[j][in_j] & hidden[i][in_i])
    return counts


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
    as lists of positions into ``edges``, dropped in the order they were dropped.

    One pass instead of finding the cycles again after every drop: removing an edge never
    puts another edge on a cycle, so the edges on a cycle at the start, visited weakest
    first, are exactly the candidates, and each is dropped when it still lies on a cycle
    (its occludee still reaches its occluder).
    """
    comp = _cyclic_components(n, edges)
    on_cycle = sorted((k for k, (a, b) in enumerate(edges) if comp[a] == comp[b]),
                      key=lambda k: (pixels[k], ratios[k], edges[k]))
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
    layers = _layers(n, edge_list)  # the cycle search only when there is a cycle
    if layers is None:
        alive, dropped = _break_cycles(n, edge_list, pixels.tolist(), ratios.tolist())
        layers = _layers(n, [edge_list[k] for k in alive])
    else:
        alive, dropped = range(len(edge_list)), []
    dropped_edges = pairs[dropped].reshape(-1, 2)
    kept = np.asarray(sorted(alive, key=lambda k: edge_list[k]), np.int64)
    edges = pairs[kept].reshape(-1, 2)

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
