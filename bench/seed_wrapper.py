"""The seed article's shape, as a baseline for bench/throughput.py: FastAPI + Uvicorn, the model
loaded once at start, one lock, ``POST /infer`` with an image and a prompt, the answer back.

    .venv/bin/python bench/seed_wrapper.py --model var/models/tiny-glm4v --port 8100
    curl -s -F image=@var/demo.png -F prompt="What is in this picture?" http://127.0.0.1:8100/infer

It calls the same engine as Sightline's workers (``inference.engine.Engine``, no batching), one
request at a time under the lock. No keys, quotas, query log, validation or streaming: it is the
thing Sightline replaces, kept here to measure against, never shipped. Imports no Django.
"""

import argparse
import io
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn  # noqa: E402
from fastapi import FastAPI, File, Form, UploadFile  # noqa: E402
from PIL import Image  # noqa: E402

from inference.engine import Engine, EngineRequest, SamplingParams  # noqa: E402


def make_app(engine: Engine) -> FastAPI:
    app = FastAPI()
    lock = threading.Lock()  # one generation at a time: the model is not shared between requests

    @app.get("/health")
    def health():
        return {"status": "ok", "model_loaded": engine.loaded}

    @app.post("/infer")
    def infer(image: UploadFile = File(...), prompt: str = Form(...), max_tokens: int = Form(256)):  # noqa: B008
        start = time.perf_counter()
        picture = Image.open(io.BytesIO(image.file.read())).convert("RGB")
        request = EngineRequest(
            messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            images=[picture],
            sampling=SamplingParams(max_new_tokens=max_tokens),
        )
        with lock:
            result = engine.generate(request)
        choice = result.choices[0]
        return {
            "result": choice.text,
            "code": 0,
            "cost_time": round(time.perf_counter() - start, 3),
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="a model folder or hub id (the tiny model: var/models/tiny-glm4v)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    engine = Engine.load(args.model)  # preloaded: the first request does not pay for it
    uvicorn.run(make_app(engine), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
