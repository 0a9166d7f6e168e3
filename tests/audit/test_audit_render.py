"""report.html renders in headless Chromium, with its sections and plots visible."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

pytest.importorskip("reportlab", reason="report.pdf is drawn with reportlab, a dependency")

from zenfed.audit.report import build_report

CHROMIUM = Path("/usr/bin/chromium")

# Colours that only the plots draw (matplotlib's first two cycle colours: the site curves),
# and the green of the 'intact' verdict banners.
PLOT_BLUE, PLOT_ORANGE, BANNER_GREEN = (31, 119, 180), (255, 127, 14), (227, 244, 232)


def _pixels_near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 6) -> int:
    return int((np.abs(img[..., :3].astype(int) - np.array(rgb)) <= tol).all(axis=-1).sum())


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium (/usr/bin/chromium) is not "
                    "installed; the project's test set-up installs it (apt-get install chromium)")
def test_report_renders_in_headless_chromium(pristine_result, tmp_path):
    # Prepare
    paths = build_report(pristine_result, out_dir=tmp_path / "report")
    shot = tmp_path / "report.png"
    # Execute
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1100,7000", f"--screenshot={shot}", paths.html.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    # Assert
    assert shot.exists(), f"chromium wrote no screenshot: {proc.stderr[-2000:]}"
    img = (mpimg.imread(shot)[..., :3] * 255).round().astype(np.uint8)
    assert img.shape[0] == 7000 and img.shape[1] == 1100
    assert img.std() > 10, "the screenshot is blank"
    assert _pixels_near(img, BANNER_GREEN) > 5000, "the verdict banners are not visible"
    assert _pixels_near(img, PLOT_BLUE) > 200, "the plots' site curves are not visible"
    assert _pixels_near(img, PLOT_ORANGE) > 200, "the plots' site curves are not visible"
