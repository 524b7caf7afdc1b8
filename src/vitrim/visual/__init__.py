"""Back to the patch grid: dense features (``forward_dense``, ``restore_grid``), provenance helpers
(``source_to_grid``, ``tokens_to_grid``) and pictures of what a method did (``visualize``)."""
from ..methods.base import TokenMap
from .dense import forward_dense, restore_grid
from .grid import source_to_grid, tokens_to_grid
from .pictures import load_image, method_color, method_panels, render_panels, visualize

__all__ = ["forward_dense", "restore_grid", "source_to_grid", "tokens_to_grid", "TokenMap", "load_image",
           "method_color", "method_panels", "render_panels", "visualize"]
