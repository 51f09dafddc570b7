"""``likeness evaluate``: the paper's Tables 1–3 (PAPER.md §4) at our scale.

Held-out people of our split are downscaled to 16×16 thumbnails and upscaled
by the search under several strategies (no control, identity, race,
attributes); the outputs are scored by F0, F and the independent judges.

- ``config``: the options, their defaults and the command line that gives them
- ``samples``: which held-out photos, their thumbnails and per-thumbnail seeds
- ``models``: the generator, F0, F and the judges, with their sha256
- ``searches``: the strategies and the batched, disk-cached searches
- ``measures``: embeddings and judge predictions of photos and outputs
- ``tables``: the numbers of Tables 1–3 from those measures (NumPy only)
- ``plots``: the angle histograms, the accuracy bars and the qualitative grids
- ``figures``: the qualitative figure of each table and the overview grid, and the
  searches only they need
- ``report``: results.json and the Markdown report beside the paper's numbers
- ``run``: the whole evaluation, end to end
"""
