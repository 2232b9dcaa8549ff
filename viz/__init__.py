"""Results you can see: retrieval grids (PNG + HTML), SSN word selection, training curves, run reports.

* :mod:`viz.examples` turns features already computed for validation into :class:`~viz.examples.QueryExample`
  rows (top-k, scores, the ground truth's rank, the caption's words with their SSN weight ``s_t``).
* :mod:`viz.grid` draws those rows as a PNG grid and as an HTML page.
* :mod:`viz.curves` reads ``metrics.jsonl`` and draws loss and every validation recall per epoch.
* :mod:`viz.report` writes ``report.md`` into a run folder: metrics next to the published SSN numbers
  (``viz/published.json``), curves, grids, arguments and environment.
* :mod:`viz.style` holds the colours all of them share.

Grids are composed with PIL (exact tile geometry, see :class:`~viz.grid.GridLayout`); curves use
matplotlib's Agg canvas directly, so nothing here needs a display or changes matplotlib's global backend.
The package imports nothing on its own: import the module you need.
"""
