"""model.localisation: bilinear upsampling convention, CAM peak, pointing game, IoU, input checks."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.localisation import cam_iou, cam_peak, point_hits, pointing_game, region_iou, upsample_cam


@pytest.mark.parametrize(("src", "dst"), [((4, 4), (256, 256)), ((3, 5), (37, 91)), ((7, 7), (224, 224)),
                                          ((8, 6), (5, 3)), ((1, 4), (9, 16)), ((4, 4), (4, 4))])
def test_upsample_matches_torch_and_opencv_bilinear(src: tuple[int, int], dst: tuple[int, int]) -> None:
    cam = np.random.default_rng(sum(src) + sum(dst)).normal(size=src)
    ours = upsample_cam(cam, dst)
    assert ours.shape == dst and ours.dtype == np.float64
    reference = F.interpolate(torch.from_numpy(cam)[None, None], size=dst, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, reference[0, 0].numpy(), atol=1e-12)
    if dst[0] >= src[0] and dst[1] >= src[1]:  # OpenCV's INTER_LINEAR agrees when enlarging
        opencv = cv2.resize(cam.astype(np.float32), (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(ours, opencv, atol=1e-5)


def test_cam_peak_is_the_centre_of_the_largest_cell_and_a_maximum_of_the_upsampled_map() -> None:
    cam = np.zeros((4, 4))
    cam[0, 3] = 2.0
    cam[2, 1] = 1.0
    # cell (0, 3) is centred at pixel coordinate (31.5, 223.5) of a 256 grid: pixels 31/32 and 223/224 are nearest;
    # the clamped edge makes 31 and 224 exact (the other two are 1/128 of a cell further into the slope)
    assert cam_peak(cam, (256, 256)) == (31, 224)
    up = upsample_cam(cam, (256, 256))
    assert up[31, 224] == up.max() == 2.0
    assert up[0, 255] == up.max()  # the plateau reaches the corner; the pixel by the cell centre is reported
    assert cam_peak(cam, (100, 60)) == (12, 52)  # centre at (12.0, 52.0) exactly
    interior = np.zeros((4, 4))
    interior[1, 2] = 1.0
    interior[1, 1] = 0.5  # the left slope is gentler, so the pixel left of the centre is the hotter one
    assert cam_peak(interior, (256, 256)) == (95, 159)
    up = upsample_cam(interior, (256, 256))
    assert up[95, 159] == up.max()
    assert cam_peak(np.full((4, 4), 0.3), (64, 64)) is None


def test_pointing_game_hits_misses_and_tolerance() -> None:
    cam = np.zeros((4, 4))
    cam[1, 2] = 1.0  # peak at (95, 159) on a 256 grid (first of the four pixels around the centre (95.5, 159.5))
    assert cam_peak(cam, (256, 256)) == (95, 159)
    mask = np.zeros((256, 256), bool)
    mask[90:100, 150:170] = True
    assert pointing_game(cam, mask)
    elsewhere = np.zeros((256, 256), bool)
    elsewhere[95, 169:180] = True  # 10 px to the right of the peak
    assert not pointing_game(cam, elsewhere)
    assert not pointing_game(cam, elsewhere, tolerance_px=9.9)
    assert pointing_game(cam, elsewhere, tolerance_px=10.0)
    assert not pointing_game(-cam, mask)  # the negated CAM peaks somewhere else (the first zero cell)
    assert not pointing_game(np.ones((4, 4)), np.ones((256, 256), bool))  # a constant CAM points nowhere
    assert point_hits((0, 0), mask, tolerance_px=200.0) and not point_hits(None, mask, tolerance_px=1e9)


def test_cam_iou_hand_computed() -> None:
    # cam [[1, 0], [0, 0]] to 4x4: weights per axis for cell 0 are (1, 0.75, 0.25, 0), so the heat is their outer
    # product; >= 0.5 keeps the top-left 2x2 (1, .75, .75, .5625); >= 0.7 keeps three of those pixels.
    cam = np.array([[1.0, 0.0], [0.0, 0.0]])
    top_left_2x3 = np.zeros((4, 4), bool)
    top_left_2x3[:2, :3] = True
    assert cam_iou(cam, top_left_2x3) == pytest.approx(4 / 6)
    top_left_2x2 = np.zeros((4, 4), bool)
    top_left_2x2[:2, :2] = True
    assert cam_iou(cam, top_left_2x2) == pytest.approx(1.0)
    assert cam_iou(cam, top_left_2x2, threshold_fraction=0.7) == pytest.approx(3 / 4)
    bottom_right = np.zeros((4, 4), bool)
    bottom_right[3, 3] = True
    assert cam_iou(cam, bottom_right) == 0.0
    # ReLU comes before upsampling (as in Grad-CAM): a strongly negative neighbour does not pull (0, 1) below 0.5
    assert cam_iou(np.array([[1.0, -5.0], [0.0, 0.0]]), top_left_2x2) == pytest.approx(1.0)
    assert cam_iou(-np.abs(cam) - 1.0, top_left_2x2) == 0.0  # nothing positive: empty hot region
    assert cam_iou(cam * 7.0, top_left_2x3) == pytest.approx(4 / 6)  # scale-free


def test_region_iou() -> None:
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[:4] = True
    b[2:6] = True
    assert region_iou(a, b) == pytest.approx(16 / 48)
    assert region_iou(b, b) == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pointing_game(np.ones((4, 4)), np.zeros((8, 8), bool)), "empty"),
        (lambda: pointing_game(np.eye(4), np.ones((8, 8)) > 2), "empty"),
        (lambda: pointing_game(np.eye(4), np.ones((8, 8), np.uint8)), "expected bool"),
        (lambda: pointing_game(np.eye(4), np.ones((8, 8), bool), tolerance_px=-1), "tolerance_px"),
        (lambda: cam_iou(np.eye(4), np.ones((8, 8), bool), threshold_fraction=0.0), "threshold_fraction"),
        (lambda: cam_iou(np.eye(4), np.ones((8, 8), bool), threshold_fraction=1.5), "threshold_fraction"),
        (lambda: cam_iou(np.full((4, 4), np.nan), np.ones((8, 8), bool)), "finite"),
        (lambda: upsample_cam(np.ones((1, 4, 4)), (8, 8)), "expected a 2-D map"),
        (lambda: upsample_cam(np.ones((4, 4)), (0, 8)), "Invalid shape"),
        (lambda: point_hits((8, 0), np.ones((8, 8), bool)), "outside the 8x8 mask"),
        (lambda: region_iou(np.ones((4, 4), bool), np.ones((8, 8), bool)), "Invalid region"),
    ],
)
def test_bad_input_is_named(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_localisation_does_not_import_torch() -> None:
    code = "import sys, model.localisation; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
