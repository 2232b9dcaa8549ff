"""The interactive retrieval page of ``app.py``: :mod:`webapp.engine` answers queries, :mod:`webapp.page` shows them.

Evaluation / visualisation layer: it uses :mod:`inference`, :mod:`evaluation`, :mod:`feature_cache` and
:mod:`viz`; nothing below it imports this package.  No re-exports: ``webapp.page`` imports Gradio, which
the engine and its tests do not need.
"""
