"""docs/shapes.png: ten test-stream images of each class, one named row per class.

Usage: python scripts/shapes_grid.py [OUT]
"""

import sys

from actvar_cli.generation import images
from actvar_cli.reference import shapes

out = sys.argv[1] if len(sys.argv) > 1 else "docs/shapes.png"
rows = [shapes.images("test", range(c * 10, c * 10 + 10), labels=[c] * 10)[0] for c in range(shapes.NUM_CLASSES)]
names = [cls.name for cls in shapes.CLASSES]
images.save_png(out, images.labelled_grid(rows, names, [f"#{j}" for j in range(10)], scale=2))
