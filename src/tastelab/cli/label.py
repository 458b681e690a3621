"""``tastelab label``: the A/B labelling web app on a folder of images (needs the ``web`` extra).

Votes go to an append-only CSV (``image_a,image_b,votes_a,votes_b``) fsynced per vote; the Elo score file
(image_comparison format) is rewritten atomically after each vote; restarting on the same files resumes.
The server listens on 127.0.0.1 unless ``--host`` says otherwise: the page can cast votes and shows every
image of the folder, so exposing it to a network is an explicit, logged choice.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import Any

logger = logging.getLogger("tastelab")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="A/B labelling web app: pick the better of two images; votes -> Elo scores")
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images (sub-folders included)")
    p.add_argument("--votes", help="votes CSV, appended to and replayed on restart "
                   "(default: IMAGE_DIR/tastelab_votes.csv)")
    p.add_argument("--scores", help="score file in image_comparison JSON format, rewritten after each vote "
                   "(default: IMAGE_DIR/tastelab_scores.json)")
    p.add_argument("--predictions", metavar="SCORE_OUT",
                   help="a `tastelab score --out` file (.jsonl/.csv/.parquet) to compare with the votes on /browse")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed the pair proposals (reproducible sessions)")
    p.add_argument("--question", help="what \"better\" means: the question shown above every pair, e.g. "
                   "\"Which photo would you rather hang on your wall?\" (stored in the score file; a restart "
                   "without it keeps the stored one; default: which image you like more)")
    live = p.add_argument_group("live model", "a personal model trained in the background as you vote")
    live.add_argument("--no-live", action="store_true", help="no live model (no feature extraction, no training)")
    live.add_argument("--live-min-votes", type=int, default=30, metavar="N",
                      help="train the first model after N votes (default: %(default)s)")
    live.add_argument("--explore", type=float, default=0.5, metavar="SHARE",
                      help="share of pairs from the ranking's own proposal; the rest are pairs the model is unsure "
                      "about or disagrees with your votes on (default: %(default)s)")
    live.add_argument("--score-folder", metavar="NEW_DIR",
                      help="a folder of new photos to rank with the model as soon as it is trained (shown on the page)")
    live.add_argument("--max-score-images", type=int, default=2000, metavar="N",
                      help="largest folder the page scores (default: %(default)s)")
    live.add_argument("--prior", action="append", metavar="MODEL_FOLDER", default=[],
                      help="a generic model folder the live model may build on (prior alone, personal + c x "
                      "prior, or a personal head fitted on top of the prior, chosen by CV as votes come in; "
                      "repeatable)")
    live.add_argument("--live-device", default="cpu", help="device of the feature extractor (default: %(default)s)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """True for 127.x, ::1 and localhost; anything else (0.0.0.0, a LAN address, a name) reaches other machines."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> list[str] | None:
    """Host headers to accept: loopback names when bound to loopback (blocks DNS rebinding), else any."""
    from tastelab.web.app import LOOPBACK_HOSTS

    return [*LOOPBACK_HOSTS, host] if is_loopback(host) else None


def own_origins(host: str, port: int) -> list[str] | None:
    """Origins allowed to change the session: the loopback spellings of this server (None off loopback: the
    request's own Host, the only name known for a server reachable under any address)."""
    from tastelab.web.guard import loopback_origins

    return loopback_origins(port, host) if is_loopback(host) else None


def build_app(args: argparse.Namespace) -> Any:
    """The session and the FastAPI app for parsed ``label`` arguments (no server started)."""
    try:
        from tastelab.web.app import create_app
    except ImportError as exc:
        raise ImportError(f"tastelab label needs the web extra: pip install 'tastelab[web]' ({exc})") from exc
    from tastelab.core.errors import UserError
    from tastelab.web.predictions import load_predictions
    from tastelab.web.session import LabelSession

    score_folder = getattr(args, "score_folder", None)
    if score_folder is not None and not os.path.isdir(score_folder):
        raise UserError(f"--score-folder {score_folder}: not an existing folder")
    session = LabelSession(args.image_dir, args.votes, args.scores, seed=args.seed, question=args.question)
    try:
        if args.predictions:
            session.predictions = load_predictions(args.predictions, session.image_dir, session.index.images)
        if not getattr(args, "no_live", True):
            start_live(session, args, score_folder)
        return create_app(session, allowed_hosts=allowed_hosts(args.host), origins=own_origins(args.host, args.port))
    except BaseException:
        if session.live is not None:
            session.live.stop()
        session.close()  # release the votes-file lock
        raise


def start_live(session: Any, args: argparse.Namespace, score_folder: str | None) -> None:
    """The live model (default feature extractor, cached features) attached to ``session``; not started."""
    from tastelab.web.live import LiveConfig, LiveModel
    from tastelab.web.personal_fit import mobilenet_extractor

    try:
        config = LiveConfig(min_votes=args.live_min_votes, explore=args.explore,
                            max_score_images=args.max_score_images, seed=args.seed or 0)
    except ValueError as exc:
        from tastelab.core.errors import UserError

        raise UserError(str(exc)) from None
    extractor, spec = mobilenet_extractor(device=args.live_device, priors=getattr(args, "prior", None) or ())
    live = LiveModel(session.index.images, session.image_dir, session.votes_path, extractor, saveable=spec,
                     config=config)
    if score_folder is not None:
        live.auto_score = live.default_folder = os.path.abspath(score_folder)
    session.attach_live(live)  # the worker starts with the server (run), so building an app starts no thread


def server_config(args: argparse.Namespace, app: Any) -> Any:
    """The uvicorn config for ``app``: host and port from the arguments, warning when not loopback-only."""
    import uvicorn

    if not is_loopback(args.host):
        logger.warning("listening on %s: anyone who can reach this machine on port %d can see the images and cast "
                       "votes (use the default --host 127.0.0.1 to keep it private)", args.host, args.port)
    return uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"tastelab label needs the web extra: pip install 'tastelab[web]' ({exc})") from exc
    app = build_app(args)
    session = app.state.session
    config = server_config(args, app)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("open http://%s:%d/ (label) and http://%s:%d/browse (ranking); Ctrl-C stops", shown, args.port,
                shown, args.port)
    if session.live is not None:
        session.live.start()
    try:
        uvicorn.Server(config).run()
    finally:
        if session.live is not None:
            # a fit cannot be interrupted: wait for it, so the interpreter never exits under a running torch op
            logger.info("stopping the live model")
            session.live.stop(timeout=None)
        session.close()
    stats = session.stats()
    logger.info("%d votes in %s; scores in %s", stats["votes"], session.votes_path, session.scores_path)
    return 0
