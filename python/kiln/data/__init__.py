"""Dataset preparation: turn IDX files (MNIST, Fashion-MNIST) into a PNG class-folder tree.

Deliberately free of torch and the compiled core so it runs in a bare Python environment.
"""

from kiln.data.idx import idx_to_png_tree, read_idx

__all__ = ["idx_to_png_tree", "read_idx"]
