"""The browser viewer (`brainanomaly view`): the Slicer module's scene code (BrainAnomalySlicer.nodes and .logic,
imported, not copied) on a trame-slicer MRML scene, served to a web browser. `session` holds what the viewer does
without any web framework; `app` puts it on a page.
"""

from __future__ import annotations

import sys
from pathlib import Path

# BrainAnomalySlicer lives in the Slicer module's folder, where Slicer puts it on the path; outside Slicer the viewer
# puts it there itself (the same folder the tests add).
_MODULE_FOLDER = Path(__file__).resolve().parent.parent / "BrainAnomaly"
if (_MODULE_FOLDER / "BrainAnomalySlicer" / "__init__.py").is_file() and str(_MODULE_FOLDER) not in sys.path:
    sys.path.insert(0, str(_MODULE_FOLDER))
