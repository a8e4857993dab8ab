"""The `cliprec` command: recommend, report, gate, serve.

Exit codes: 0 success (gate: passed), 1 gate failed, 2 a usage or input problem (one line on stderr;
the traceback with --debug or CLIPREC_DEBUG=1); `serve`: 3 when its address cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cliprec.errors import USER_ERROR_EXIT, CliprecError, debug_enabled

log = logging.getLogger("cliprec")


def _number(text: str, kind: type[int] | type[float], low: float, high: float = float("inf")) -> float:
    """argparse type: a number in [low, high], else a one-line usage error (exit 2)."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        bounds = f"{low:g}..{high:g}" if high != float("inf") else f">= {low:g}"
        raise argparse.ArgumentTypeError(
            f"must be a{'n integer' if kind is int else ' number'} {bounds}, not {text!r}"
        )
    return value


def _positive(text: str) -> int:
    return int(_number(text, int, 1))


def _port(text: str) -> int:
    return int(_number(text, int, 0, 65535))  # 0: the kernel picks one, and serve logs it


def _positive_mb(text: str) -> float:
    return _number(text, float, 0.001)


def _seconds(text: str) -> float:
    return _number(text, float, 0.1, 3600)


def _positive_kb(text: str) -> int:
    return int(_number(text, int, 1, 1024))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliprec", description="CLIP product recommendations (DVC project)."
    )
    parser.add_argument(
        "--root", default=".", help="project root (where params.yaml and data/ are); default: ."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--debug", action="store_true", help="full tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", required=True)
    _recommend_options(
        sub.add_parser("recommend", help="recommend products by text, image, text+image or product")
    )
    _report_options(
        sub.add_parser(
            "report", help="metrics with 95% CIs and paired differences: zero-shot / LoRA / LoRA+AMP"
        )
    )
    _gate_options(
        sub.add_parser(
            "gate", help="fail when retrieval really dropped vs a git revision (or its test set changed)"
        )
    )
    _noise_options(
        sub.add_parser("noise", help="retrain with other training seeds; write each metric's seed spread")
    )
    srv = sub.add_parser("serve", help="HTTP API and web page (FastAPI + uvicorn); Ctrl-C stops it")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free one, logged)")
    srv.add_argument(
        "--category", action="append", help="serve only these categories (repeatable; default: all)"
    )
    srv.add_argument(
        "--max-inflight", type=_positive, default=64, help="work requests admitted at once; more get 503 (64)"
    )
    srv.add_argument("--max-upload-mb", type=_positive_mb, default=10.0, help="largest image upload (10 MB)")
    srv.add_argument("--max-k", type=_positive, default=100, help="largest k a search may ask for (100)")
    srv.add_argument(
        "--decode-workers", type=_positive, default=2, help="processes decoding image uploads (2)"
    )
    srv.add_argument(
        "--decode-timeout", type=_seconds, default=4.0, help="longest decode of an upload, s (4)"
    )
    srv.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch/FAISS threads per query (default 1; docs/serving.md, Load)",
    )
    srv.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    _serve_connection_options(srv)
    return parser


def _report_options(rep: argparse.ArgumentParser) -> None:
    rep.add_argument("--from-exp", metavar="NAME", help="take the LoRA+AMP rows from this DVC experiment")
    rep.add_argument(
        "--against",
        metavar="EXP_OR_REV",
        help="compare LoRA+AMP with this experiment or git revision (default: the commit it derives from)",
    )
    rep.add_argument("--category", action="append", help="only these categories (repeatable)")
    rep.add_argument("--json", action="store_true", help="the numbers as JSON: value, CI, paired differences")


def _gate_options(gate: argparse.ArgumentParser) -> None:
    gate.add_argument("--rev", default="HEAD", help="git revision to compare with (default HEAD)")
    gate.add_argument(
        "--tolerance", type=float, help="a smaller drop never fails (default: params gate.tolerance)"
    )
    gate.add_argument("--alpha", type=float, help="significance level (default: params gate.alpha)")
    gate.add_argument(
        "--allow-new-test-set", action="store_true", help="do not fail on a changed test set (not compared)"
    )
    gate.add_argument(
        "--reproduce",
        action="store_true",
        help="instead: require every per-query rank and metric to equal the revision's (CI's repro check)",
    )


def _noise_options(noise: argparse.ArgumentParser) -> None:
    how = noise.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--seeds", type=int, nargs="+", metavar="S", help="retrain with these seeds (dvc exp run)"
    )
    how.add_argument("--exps", nargs="+", metavar="NAME", help="collect these finished experiments instead")
    noise.add_argument("--category", action="append", help="only these categories (repeatable)")


def _recommend_options(rec: argparse.ArgumentParser) -> None:
    """The options of `cliprec recommend`: the query (cliprec.query.Query) and the output."""
    rec.add_argument("--category", required=True, help="a category of params.yaml, e.g. Amazon_Fashion")
    rec.add_argument("--text", help="query text")
    rec.add_argument("--image", help="query image: local path or http(s)/file URL")
    rec.add_argument("--product", help="product id (parent_asin): more like this product")
    rec.add_argument("--k", type=int, default=5, help="number of results (default 5)")
    rec.add_argument("--variant", default="lora", choices=("lora", "zeroshot"), help="embeddings to use")
    rec.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rec.add_argument("--grid", metavar="OUT.png", help="also write a picture of the query and the results")


def _serve_connection_options(srv: argparse.ArgumentParser) -> None:
    """The connection limits of `cliprec serve` (docs/serving.md, Connection limits)."""
    srv.add_argument(
        "--max-connections",
        type=_positive,
        help="open connections; more are refused with 503 (default 10000, at most half the fd limit)",
    )
    srv.add_argument(
        "--max-header-kb", type=_positive_kb, default=16, help="request line + headers; more get 431 (16)"
    )
    srv.add_argument(
        "--header-timeout", type=_seconds, default=10.0, help="seconds for a request's head (10); then 408"
    )
    srv.add_argument(
        "--body-timeout", type=_seconds, default=30.0, help="seconds for a request's body (30); then 408"
    )
    srv.add_argument(
        "--idle-timeout", type=_seconds, default=5.0, help="seconds a connection may wait idle (5)"
    )


def _recommend(args: argparse.Namespace) -> int:
    from cliprec import paths
    from cliprec.query import Query, QueryError
    from cliprec.recommend import Recommender, as_json, as_table, render_grid, thumbnails

    try:  # before anything loads: a query that cannot be asked fails at once
        query = Query(text=args.text, image=args.image, product=args.product, k=args.k)
    except QueryError as e:
        raise CliprecError(e.as_options()) from None
    rec = Recommender(args.category, args.variant, root=args.root)
    if query.product is None and not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr for every query
    hits = rec.recommend(query)
    print(as_json(args.category, args.variant, query, hits) if args.json else as_table(hits))
    if args.grid:
        wanted = [h.id for h in hits] + ([query.product] if query.product else [])
        images = thumbnails(Path(args.root) / paths.images_dir(args.category), wanted)
        out = render_grid(query, hits, images, args.grid)
        log.info("wrote %s", out)
    return 0


def _report(args: argparse.Namespace) -> int:
    from cliprec.report import build_report, build_report_json

    build = build_report_json if args.json else build_report
    print(build(args.root, categories=args.category, from_exp=args.from_exp, against=args.against), end="")
    return 0


def _gate(args: argparse.Namespace) -> int:
    from cliprec.gate import GateRule, reproduce, run_gate
    from cliprec.params import load_params

    if args.reproduce:
        passed, table = reproduce(args.rev, root=args.root)
    else:
        p = load_params(Path(args.root) / "params.yaml")
        rule = GateRule(
            tolerance=p.gate.tolerance if args.tolerance is None else args.tolerance,
            alpha=p.gate.alpha if args.alpha is None else args.alpha,
            resamples=p.evaluate.resamples,
            seed=p.evaluate.seed,
            allow_new_test_set=args.allow_new_test_set,
        )
        from cliprec.evaluate import EvalSettings

        passed, table = run_gate(args.rev, rule, root=args.root, audit_with=EvalSettings.from_params(p))
    print(table, end="")
    return 0 if passed else 1


def _noise(args: argparse.Namespace) -> int:
    from cliprec.noise import collect, retrain, write_noise
    from cliprec.params import load_params

    p = load_params(Path(args.root) / "params.yaml")
    runs = retrain(args.root, args.seeds, p.seed) if args.seeds else collect(args.root, args.exps, p.seed)
    docs = write_noise(args.root, args.category or p.categories, runs)
    for cat, doc in docs.items():
        r5 = doc["variants"]["lora"].get("text_to_image", {}).get("recall_at_5")
        if r5:
            print(f"{cat}: LoRA T→I R@5 over seeds {doc['seeds']}: {r5['mean']:.3f} ± {r5['sd']:.3f} "
                  f"(range {r5['min']:.3f}–{r5['max']:.3f}); seed-to-seed differences "
                  f"{r5['diff']['q025']:+.3f} to {r5['diff']['q975']:+.3f}")  # fmt: skip
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cliprec.serve import ServeSettings, run
    from cliprec.serve.server import LISTEN_ERROR_EXIT, ListenError

    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars among the server's log lines
        logging.getLogger("cliprec").setLevel(logging.INFO)  # a server's progress is its output
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_k=args.max_k,
        max_inflight=args.max_inflight,
        threads=args.threads,
        decode_workers=args.decode_workers,
        decode_timeout_s=args.decode_timeout,
        max_connections=args.max_connections,
        max_header_bytes=args.max_header_kb * 1024,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        idle_timeout_s=args.idle_timeout,
    )
    try:
        return run(args.root, args.host, args.port, args.category, settings, access_log=args.access_log)
    except ListenError as e:  # a port taken is not a usage problem: its own status, for supervisors
        print(f"cliprec serve: error: {e}", file=sys.stderr)
        return LISTEN_ERROR_EXIT
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after its graceful shutdown
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cliprec` console script."""
    args = _parser().parse_args(argv)
    # stdout is the answer; stderr gets warnings, or cliprec's progress with -v (other libraries' INFO,
    # e.g. faiss' loader, stays quiet)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("cliprec").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not Path(args.root).is_dir():
        print(f"cliprec: error: --root {args.root} is not a directory", file=sys.stderr)
        return 2
    handlers = {"recommend": _recommend, "report": _report, "gate": _gate, "noise": _noise, "serve": _serve}
    try:
        return handlers[args.command](args)
    except CliprecError as e:
        if args.debug or debug_enabled():
            raise
        print(f"cliprec {args.command}: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except BrokenPipeError:  # `cliprec ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
