"""The example thumbnails: skimage's astronaut photo (public domain, NASA), its face
found by MTCNN and warped into the FFHQ frame the generator draws, then downscaled
by the search's own operator to 16 and 32 px. Run from the repository root:

    python docs/examples/make.py

A thumbnail framed tighter or looser than that frame asks the generator for a
face of another size, which it can only draw by leaving its faces behind (pale
streaks across the eyes, smeared mouths): frame inputs like these.
"""

import numpy as np
import torch
from PIL import Image
from skimage import data

from worker.engine.downscale import downscale
from worker.engine.face.alignment import detect_landmarks
from worker.engine.face.ffhq_frame import to_ffhq_frame

pixels = np.ascontiguousarray(data.astronaut())
photo = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None]
landmarks, found, _ = detect_landmarks(photo)
assert bool(found[0]), "MTCNN found no face"
framed = to_ffhq_frame(photo, landmarks)
for side in (16, 32):
    small = downscale(framed, (side, side))[0].clamp(0, 1).mul(255).round().byte()
    Image.fromarray(small.permute(1, 2, 0).numpy()).save(f"docs/examples/astronaut_{side}.png")
