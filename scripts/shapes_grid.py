"""docs/shapes.png: ten test-stream images of each class, one row per class (2x, nearest).

Usage: python scripts/shapes_grid.py [OUT]
"""

import sys

import numpy as np
from PIL import Image

from actvar_cli import shapes

out = sys.argv[1] if len(sys.argv) > 1 else "docs/shapes.png"
rows = []
for c in range(shapes.NUM_CLASSES):
    imgs, _ = shapes.images("test", range(c * 10, c * 10 + 10), labels=[c] * 10)
    rows.append(np.concatenate(list(imgs), axis=1))
grid = np.concatenate(rows, axis=0)
Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out)
