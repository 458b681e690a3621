"""A/B labelling web app (``tastelab label``): pick the better of two images, get a ranking and a score file.

Layout:

* :mod:`tastelab.web.state` — the ranking behind a small interface (:class:`~tastelab.web.state.Ranker`):
  incremental Elo, undo, active pair proposal, settledness;
* :mod:`tastelab.web.votes` — the votes file: an append-only ``image_a,image_b,votes_a,votes_b`` CSV, fsynced
  per vote, rewritten atomically on undo, replayed on restart;
* :mod:`tastelab.web.session` — one labelling session: image index, safe image paths, pair ids, the lock that
  makes vote + write atomic across tabs, stats and the browse table;
* :mod:`tastelab.web.guard` — the checks every state-changing request passes (own Origin, per-process token,
  JSON body, size limit), so no other web page can cast or undo votes;
* :mod:`tastelab.web.app` — the FastAPI app (JSON API + static pages under ``static/``).

FastAPI and uvicorn come from the ``web`` extra; nothing here is imported by the core package.
"""
