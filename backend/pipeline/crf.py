"""The dense CRF of one mask, in a module light enough for the refinement pool's processes.

pydensecrf holds the GIL while it runs, so CRFs only run in parallel in separate
processes (see ``refine.Refiner``); each of those imports this module alone, without
torch or the models.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels

# CRF parameters, from the authors' released code.
CRF_GT_PROB = 0.9  # confidence of the hard mask in the unary term
CRF_GAUSSIAN_SXY = 20  # smoothness kernel, spatial standard deviation (pixels)
CRF_GAUSSIAN_COMPAT = 5  # smoothness kernel, Potts weight
CRF_BILATERAL_SXY = 20  # appearance kernel, spatial standard deviation (pixels)
CRF_BILATERAL_SRGB = 20  # appearance kernel, colour standard deviation (0-255 units)
CRF_BILATERAL_COMPAT = 100  # appearance kernel, Potts weight
CRF_ITERATIONS = 10  # mean-field iterations


def crf_refine(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One binary dense CRF (labels: 0 outside, 1 inside) started from a hard mask."""
    height, width = mask.shape
    crf = dcrf.DenseCRF2D(width, height, 2)
    unary = unary_from_labels(mask.astype(np.int32), 2, gt_prob=CRF_GT_PROB, zero_unsure=False)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=CRF_GAUSSIAN_SXY, compat=CRF_GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(
        sxy=CRF_BILATERAL_SXY,
        srgb=CRF_BILATERAL_SRGB,
        rgbim=np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]),  # pydensecrf needs both
        compat=CRF_BILATERAL_COMPAT,
    )
    q = np.asarray(crf.inference(CRF_ITERATIONS)).reshape(2, height, width)
    return q[1] > q[0]
