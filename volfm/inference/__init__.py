"""volfm.inference: sliding-window inference over a whole stored volume and mapping the result back onto the
source image's grid (one implementation, used by the tasks, ``volfm predict`` and the benchmarks)."""
from volfm.inference.sliding_window import (
    SlidingWindowInferer,
    grid_starts,
    importance_map,
    predict_to_source,
)

__all__ = ["SlidingWindowInferer", "grid_starts", "importance_map", "predict_to_source"]
