"""Sample grids: one class per row for a conditional model's samples."""

import numpy as np

from diffusion_jax import reporting


def test_class_rows_put_each_class_on_its_own_row_in_order():
    images = np.arange(7, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    labels = np.array([2, 0, 2, 1, 0, 2, 2])  # class 0: images 1, 4; 1: 3; 2: 0, 2, 5, 6
    rows, ncols = reporting.class_rows(images, labels)
    assert ncols == 4 and rows.shape == (12, 2, 2, 1)
    want = [1, 4, 255, 255, 3, 255, 255, 255, 0, 2, 5, 6]  # short rows filled with white
    np.testing.assert_array_equal(rows[:, 0, 0, 0], want)
    grid = reporting.image_grid(rows, ncols)
    assert grid.shape == (3 * 3 + 1, 4 * 3 + 1, 1)
    np.testing.assert_array_equal(grid[1:3, 1:3, 0], 1)  # row 0, column 0: image 1 (class 0)
    np.testing.assert_array_equal(grid[7:9, 10:12, 0], 6)  # row 2, column 3: image 6 (class 2)
