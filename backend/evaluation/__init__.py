"""Scoring segmentations against benchmark ground truth (Pascal VOC, COCO-Object, COCO-27).

``metrics`` accumulates the confusion matrix, ``datasets`` reads the local dataset layouts and
``run`` scores either saved label-index PNGs or a segmentation function.
"""
