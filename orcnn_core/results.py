"""Predictions as a COCO results list (docs/data_format.md), the input of evaluation."""

import numpy as np

from orcnn_core.masks import encode
from orcnn_core.occlusion import OcclusionGraph, occlusion_graph, pick_ranks
from orcnn_core.prediction import HIDDEN, VISIBLE, Prediction


def prediction_to_coco(prediction: Prediction, image_id: int, mask_padding: int = 0,
                       category_ids=None, graph: OcclusionGraph = None) -> list:
    """COCO result entries of one image's prediction.

    Masks are written on the canvas of the ground truth, the image grown by
    ``mask_padding`` pixels on every side, so amodal parts outside the image are kept as far
    as the canvas reaches. ``category_ids[k - 1]`` is the category id of label k (default:
    the label itself). Each entry's ``order`` is what the perception node publishes for the
    instance: its place in the pick order, its free probability and the instances it lies
    on, from ``graph`` (default: :func:`~orcnn_core.occlusion.occlusion_graph` with its
    default rule).
    """
    orders = _order_entries(prediction, graph)
    height, width = prediction.image_size
    p = int(mask_padding)
    canvas_h, canvas_w = height + 2 * p, width + 2 * p
    results = []
    for i, ((x, y, w, h), crop) in enumerate(zip(prediction.rois, prediction.crops)):
        amodal = np.zeros((canvas_h, canvas_w), np.uint8)
        visible = np.zeros((canvas_h, canvas_w), np.uint8)
        # The roi on the canvas, clipped to it.
        cx0, cy0 = max(x + p, 0), max(y + p, 0)
        cx1, cy1 = min(x + p + w, canvas_w), min(y + p + h, canvas_h)
        if cx1 > cx0 and cy1 > cy0:
            window = crop[cy0 - (y + p):cy1 - (y + p), cx0 - (x + p):cx1 - (x + p)]
            amodal[cy0:cy1, cx0:cx1] = (window == VISIBLE) | (window == HIDDEN)
            visible[cy0:cy1, cx0:cx1] = window == VISIBLE
        label = int(prediction.labels[i])
        x1, y1, x2, y2 = (float(v) for v in prediction.boxes[i])
        results.append({
            "image_id": int(image_id),
            "category_id": int(category_ids[label - 1]) if category_ids is not None else label,
            "score": float(prediction.scores[i]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "segmentation": encode(amodal),
            "visible_mask": encode(visible),
            "order": orders[i],
        })
    return results


def _order_entries(prediction: Prediction, graph) -> list:
    """Per instance: ``{"index", "pick_rank", "free_probability", "lies_on": [[index,
    confidence], ...]}`` (indices within the image's entries, in prediction order)."""
    if graph is None:
        graph = occlusion_graph(prediction)
    rank = pick_ranks(graph)
    lies_on = [[] for _ in range(len(prediction))]
    for (a, b), c in zip(graph.edges.tolist(), graph.confidence.tolist()):
        lies_on[a].append([b, round(c, 6)])
    return [{"index": i, "pick_rank": int(rank[i]),
             "free_probability": round(float(graph.free_probability[i]), 6),
             "lies_on": lies_on[i]} for i in range(len(prediction))]
