"""Explanations of learned similarities, and measurements of how faithful they are.

:mod:`.correspondence`: does the DIML transport plan link corresponding parts? Measured with
ground-truth part keypoints (its public names are re-exported here).
:mod:`.groups`: a DGML score as the sum of per-group cosines, with each group's attention.
:mod:`.group_parts`: how distinct the DGML groups are (top-region IoU, peak-to-part).
:mod:`.group_sharpness`: how many positions each DGML group attends to (the positions holding
90% of its attention, the perplexity).
The figure, pair, groups, group_parts and group_sharpness modules are imported by their own paths.
"""

from glassmetric.explain.correspondence import (
    CorrespondenceStats,
    correspondence_upper_bound,
    evaluate_correspondence,
    keypoint_cells,
    keypoints_to_eval_frame,
    part_correspondence,
    part_correspondence_batch,
    resized_size,
    sample_same_class_pairs,
)

__all__ = [
    "CorrespondenceStats",
    "correspondence_upper_bound",
    "evaluate_correspondence",
    "keypoint_cells",
    "keypoints_to_eval_frame",
    "part_correspondence",
    "part_correspondence_batch",
    "resized_size",
    "sample_same_class_pairs",
]
