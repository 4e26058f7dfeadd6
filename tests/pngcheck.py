"""Checks of the plots the stages write: a real PNG of the expected layout with the plotted series drawn
(not "the file is bigger than 0 bytes", which an empty or broken figure also passes)."""
from __future__ import annotations

import struct
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the IHDR chunk; AssertionError unless the file is a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def colour_pixels(path: Path, colour: str, alpha: float = 1.0, tol: int = 8) -> int:
    """Pixels drawn in a matplotlib `colour` ("C0", "C1", ...) at opacity `alpha` over a white background,
    within `tol` of 255 per channel."""
    import matplotlib.colors
    import matplotlib.image
    import numpy as np

    rgb = np.array(matplotlib.colors.to_rgb(colour)) * alpha + (1.0 - alpha)
    image = matplotlib.image.imread(str(path))[..., :3]
    return int((np.abs(image - rgb) * 255 <= tol).all(axis=-1).sum())


def assert_plot(path: Path, series: int, alpha: float = 1.0, min_pixels: int = 30) -> None:
    """`path` is a PNG in which exactly the first `series` colours of matplotlib's cycle are drawn: one per
    plotted line or histogram, and no more."""
    width, height = png_size(path)
    assert width >= 300 and height >= 200, (path, width, height)
    for i in range(series):
        assert colour_pixels(path, f"C{i}", alpha) >= min_pixels, f"{path}: series C{i} is not drawn"
    assert colour_pixels(path, f"C{series}", alpha) < min_pixels, f"{path}: a series C{series} is drawn too"
