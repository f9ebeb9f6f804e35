"""Label maps to Label Studio results: brush RLE regions and the prediction around them.

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
from backend.pipeline.segmenter import Segmentation


def region_id(from_name: str, label: str) -> str:
    """A stable id: the same prediction twice has the same region ids."""
    return hashlib.sha1(f"{from_name}\x00{label}".encode()).hexdigest()[:10]


def brush_results(segmentation: Segmentation, from_name: str, to_name: str) -> list[dict]:
    """One ``brushlabels`` result per labelled region."""
    height, width = segmentation.label_map.shape
    results = []
    for region in segmentation.regions:
        rle = brush_rle(segmentation.label_map == region.label + 1)
        results.append({
            "id": region_id(from_name, region.name),
            "from_name": from_name,
            "to_name": to_name,
            "type": "brushlabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "score": round(region.score, 4),
            "value": {"format": "rle", "rle": rle, "brushlabels": [region.name]},
        })
    return results


MIN_POLYGON_AREA = 16  # pixels; smaller specks are noise, not regions a person would draw
POLYGON_TOLERANCE = 1.0  # pixels a simplified outline may deviate from the mask's edge


def polygon_results(segmentation: Segmentation, from_name: str, to_name: str) -> list[dict]:
    """``polygonlabels`` results: the outer outline of each connected part of each region."""
    height, width = segmentation.label_map.shape
    results = []
    for region in segmentation.regions:
        mask = (segmentation.label_map == region.label + 1).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outlines = [cv2.approxPolyDP(c, POLYGON_TOLERANCE, True)[:, 0] for c in contours
                    if cv2.contourArea(c) >= MIN_POLYGON_AREA]
        for index, outline in enumerate(o for o in outlines if len(o) >= 3):
            points = [[round(100.0 * x / width, 3), round(100.0 * y / height, 3)] for x, y in outline.tolist()]
            results.append({
                "id": f"{region_id(from_name, region.name)}-{index}",
                "from_name": from_name,
                "to_name": to_name,
                "type": "polygonlabels",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "score": round(region.score, 4),
                "value": {"points": points, "closed": True, "polygonlabels": [region.name]},
            })
    return results


def prediction(results: list[dict], score: float, model_version: str) -> dict:
    """A Label Studio prediction: its results, overall score and model version."""
    return {"result": results, "score": round(score, 4), "model_version": model_version}


def project_prediction(segmentation: Segmentation, vocabulary: ProjectVocabulary, model_version: str) -> dict:
    """The prediction a project's label config asks for: polygons for PolygonLabels, else brush masks."""
    to_results = polygon_results if vocabulary.result_type == "polygonlabels" else brush_results
    results = to_results(segmentation, vocabulary.from_name, vocabulary.to_name)
    return prediction(results, segmentation.score, model_version)
