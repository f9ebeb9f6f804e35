"""Label maps to Label Studio results: brush RLE regions or polygons, each in the one result envelope
(``labelled_result``), and the prediction around them.

Translated here, at the edge, once. Each region carries a label taken from the
project's config (an empty or unknown ``brushlabels`` renders as an unlabeled region)
and the mask in the orientation the browser shows, sized exactly as the image.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

from backend.labelstudio.config import ProjectVocabulary
from backend.labelstudio.rle import brush_rle
from backend.pipeline.coordinates import PERCENT, to_frame
from backend.pipeline.segmenter import Region, Segmentation


def region_id(from_name: str, label: str) -> str:
    """A stable id: the same prediction twice has the same region ids."""
    return hashlib.sha1(f"{from_name}\x00{label}".encode()).hexdigest()[:10]


def labelled_result(result_type: str, result_id: str, region: Region, shape: tuple[int, int], from_name: str,
                    to_name: str, value: dict) -> dict:
    """The envelope every result shares: ``region``'s name and score around its ``value`` (an RLE, points),
    on an image of ``shape`` (H, W)."""
    height, width = shape
    return {
        "id": result_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": result_type,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "score": round(region.score, 4),
        "value": {**value, result_type: [region.name]},
    }


def brush_results(segmentation: Segmentation, from_name: str, to_name: str) -> list[dict]:
    """One ``brushlabels`` result per labelled region."""
    return [labelled_result("brushlabels", region_id(from_name, region.name), region, segmentation.label_map.shape,
                            from_name, to_name, {"format": "rle", "rle": brush_rle(segmentation.region_mask(region))})
            for region in segmentation.regions]


MIN_POLYGON_AREA = 16  # pixels; smaller specks are noise, not regions a person would draw
POLYGON_TOLERANCE = 1.0  # pixels a simplified outline may deviate from the mask's edge


def polygon_results(segmentation: Segmentation, from_name: str, to_name: str) -> list[dict]:
    """``polygonlabels`` results: the outer outline of each connected part of each region."""
    height, width = segmentation.label_map.shape
    results = []
    for region in segmentation.regions:
        mask = segmentation.region_mask(region).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outlines = [cv2.approxPolyDP(c, POLYGON_TOLERANCE, True)[:, 0] for c in contours
                    if cv2.contourArea(c) >= MIN_POLYGON_AREA]
        for index, outline in enumerate(o for o in outlines if len(o) >= 3):
            points = [[round(coordinate, 3) for coordinate in to_frame(x, y, (width, height), PERCENT)]
                      for x, y in outline.tolist()]
            results.append(labelled_result("polygonlabels", f"{region_id(from_name, region.name)}-{index}", region,
                                           (height, width), from_name, to_name, {"points": points, "closed": True}))
    return results


def prediction(results: list[dict], score: float, model_version: str) -> dict:
    """A Label Studio prediction: its results, overall score and model version."""
    return {"result": results, "score": round(score, 4), "model_version": model_version}


def project_prediction(segmentation: Segmentation, vocabulary: ProjectVocabulary, model_version: str) -> dict:
    """The prediction a project's label config asks for: polygons for PolygonLabels, else brush masks."""
    to_results = polygon_results if vocabulary.result_type == "polygonlabels" else brush_results
    results = to_results(segmentation, vocabulary.from_name, vocabulary.to_name)
    return prediction(results, segmentation.score, model_version)
