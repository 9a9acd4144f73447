"""Engine throughput: completion tokens/s for many concurrent queries (each an image and a question),
through the in-process engine (its batch scheduler) or an OpenAI-compatible engine server through
the ``openai`` backend's client — the two engines a worker can drive.

    .venv/bin/python bench/engine_backends.py --backend transformers         # the tiny model, in process
    .venv/bin/python bench/engine_backends.py --backend openai --serve-tiny  # transformers serve of it, CPU
    .venv/bin/python bench/engine_backends.py --backend openai --url http://127.0.0.1:8001 \\
        --model zai-org/GLM-4.6V-Flash --concurrency 64 --queries 256 --max-tokens 256   # a vLLM server

Every query asks for exactly ``--max-tokens`` (``ignore_eos`` is not portable; the tiny model never
stops early, a real model may: the figure counts the tokens really generated). On the tiny model
(random weights, CPU) the figures measure the plumbing, not a GPU.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import spread  # noqa: E402


def _request(i: int, side: int, max_tokens: int):
    from PIL import Image

    from inference.engine import EngineRequest, SamplingParams

    picture = Image.new("RGB", (side, side * 3 // 4), ((37 * i) % 256, 120, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe picture {i}."}]}]
    return EngineRequest(
        messages=messages, images=[picture], sampling=SamplingParams(max_new_tokens=max_tokens, temperature=0)
    )


def _tiny_model() -> str:
    from inference.engine.tiny_model import build_tiny_model

    folder = Path(__file__).resolve().parent.parent / "var" / "models" / "tiny-glm4v"
    if not (folder / "config.json").exists():
        folder = Path(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-glm4v"))
    return str(folder)


def _serve(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [str(Path(sys.executable).with_name("transformers")), "serve", model, "--device", "cpu"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit("transformers serve did not start")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("transformers", "openai"), required=True)
    parser.add_argument("--url", help="the engine server (openai)")
    parser.add_argument("--model", help="path or hub id (transformers); the id the server serves (openai)")
    parser.add_argument("--serve-tiny", action="store_true", help="start transformers serve on the tiny model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--queries", type=int, default=0, help="default: 4 x concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=448)
    args = parser.parse_args()
    queries = args.queries or 4 * args.concurrency

    server = None
    if args.backend == "transformers":
        from inference.engine import Engine

        engine = Engine.load(args.model or _tiny_model())
        engine.enable_batching(max_batch=args.concurrency, wait_ms=5, max_tokens=1 << 20)
        where = f"in process on {engine.device}"
    else:
        from inference.engine.remote import RemoteEngine

        model = args.model
        url = args.url
        if args.serve_tiny:
            model = model or _tiny_model()
            server, url = _serve(model)
        if not url or not model:
            raise SystemExit("--backend openai wants --url and --model (or --serve-tiny)")
        engine = RemoteEngine(url, model, max_inflight=args.concurrency).start_monitor()
        if not engine.wait_ready(600):
            raise SystemExit(f"the engine server is not ready: {engine.status()['error']}")
        where = f"engine server {engine.url}"
    try:
        engine.generate(_request(0, args.image_side, 4))  # warm up
        latencies, tokens = [], []
        lock = threading.Lock()

        def one(i):
            start = time.perf_counter()
            result = engine.generate(_request(i, args.image_side, args.max_tokens))
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(result.completion_tokens)

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(queries)))
        wall = time.perf_counter() - start
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    print(f"{args.backend} ({where}): {queries} queries, {args.concurrency} at once, max_tokens {args.max_tokens}")
    print(f"  {sum(tokens) / wall:10.1f} completion tokens/s   {queries / wall:8.2f} queries/s   wall {wall:.1f} s")
    print(f"  latency per query: {spread(latencies, 1000)}")


if __name__ == "__main__":
    main()
