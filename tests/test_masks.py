"""COCO mask encodings: every accepted form decodes to the same mask as pycocotools."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from orcnn_core.errors import InputError
from orcnn_core.masks import decode, encode, pad_mask, to_rle


def random_masks(seed, count=50):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        yield (rng.random((h, w)) < rng.random()).astype(np.uint8)


def uncompressed_counts(mask):
    """Run lengths in column-major order, starting with a run of zeros (COCO's layout)."""
    flat = mask.ravel(order="F")
    runs, current, length = [], 0, 0
    for value in flat:
        if value == current:
            length += 1
        else:
            runs.append(length)
            current, length = value, 1
    runs.append(length)
    return [int(r) for r in runs]


@pytest.mark.parametrize("counts_type", ["str", "bytes", "list"])
def test_every_rle_form_decodes_to_the_mask(counts_type):
    for mask in random_masks(seed=len(counts_type)):
        h, w = mask.shape
        reference = mask_utils.encode(np.asfortranarray(mask))
        if counts_type == "str":
            segm = {"size": [h, w], "counts": reference["counts"].decode("ascii")}
        elif counts_type == "bytes":
            segm = reference
        else:
            segm = {"size": [h, w], "counts": uncompressed_counts(mask)}
        rle = to_rle(segm, h, w, "t")
        assert isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode(rle), mask)


def test_encode_decode_round_trip():
    for mask in random_masks(seed=7):
        np.testing.assert_array_equal(decode(encode(mask)), mask)


def test_polygon_is_rasterised_like_pycocotools_and_shifted_by_the_padding():
    poly = [[2.0, 1.0, 9.0, 2.0, 7.5, 8.0, 1.0, 6.0]]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 10, 12)))
    np.testing.assert_array_equal(decode(to_rle(poly, 10, 12, "t")), expected)
    padded = decode(to_rle(poly, 14, 16, "t", polygon_offset=2))
    np.testing.assert_array_equal(padded, pad_mask(expected, 2))


@pytest.mark.parametrize("segm, message", [
    ({"size": [5, 7], "counts": "8230007"}, "disagrees with the image canvas [5, 6]"),
    ({"size": [5, 6], "counts": "8230"}, "runs do not cover"),
    ({"size": [5, 6], "counts": "\x7f\x7f"}, "corrupt RLE counts"),
    ({"size": [5, 6], "counts": "8230007P"}, "truncated"),
    ({"size": [5, 6], "counts": [8, 2, 3]}, "summing to 5 x 6"),
    ({"size": [5, 6], "counts": [8, -2, 24]}, "non-negative"),
    ({"size": [5, 6]}, "needs 'size' and 'counts'"),
    ({"size": "5x6", "counts": "8230007"}, "[height, width]"),
    ([[1, 1, 4, 1]], "polygon with 2 points"),
    ([[1, 1, 4, "a", 4, 3]], "flat list of x, y numbers"),
    ([], "empty polygon list"),
    (42, "must be an RLE dict or a list of polygons"),
])
def test_bad_segmentation_names_its_place(segm, message):
    with pytest.raises(InputError) as info:
        to_rle(segm, 5, 6, "gt.json: annotation 12: segmentation")
    assert str(info.value).startswith("gt.json: annotation 12: segmentation: ")
    assert message in str(info.value)
