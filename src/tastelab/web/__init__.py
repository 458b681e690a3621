"""A/B labelling web app (``tastelab label``): pick the better of two images, get a ranking and a score file.

Layout:

* :mod:`tastelab.web.session` — one labelling session: image index, safe image paths, pair ids, the lock that
  makes vote + write atomic across tabs, stats and the browse table. Its ranking is
  :class:`tastelab.pairwise.ratings.RatingState` (incremental Elo, exact undo, pair proposals that avoid
  excluded pairs); its votes file is :class:`tastelab.io.votes.VotesLog` (an append-only
  ``image_a,image_b,votes_a,votes_b,seconds`` CSV, fsynced per vote, rewritten atomically on undo, replayed
  on restart);
* :mod:`tastelab.web.state` — settledness and rank agreement (scipy's Spearman via
  :func:`tastelab.evaluation.metrics.srcc`);
* :mod:`tastelab.web.guard` — the checks every state-changing request passes (own Origin, per-process token,
  JSON body, size limit), so no other web page can cast or undo votes;
* :mod:`tastelab.web.app` — the FastAPI app (JSON API + static pages under ``static/``).

FastAPI and uvicorn come from the ``web`` extra; nothing here is imported by the core package.
"""
