"""Batch jobs that run the segmenter outside the Label Studio server."""
