"""The official `openai` SDK streaming an answer about an image from Sightline, unchanged.

    make serve                      # in one terminal: prints a key
    .venv/bin/python bench/openai_stream.py --api-key sl_XXXXXXXX_... [--base-url http://127.0.0.1:8000/v1]

On the embedded default the model is the tiny random one: the streamed answer is noise.
"""

import argparse
import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402

from inference.samples import sample_png  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--image", type=Path, help="a picture (default: a drawn house under the sun)")
    parser.add_argument("--prompt", default="What is in this picture?")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    image = args.image.read_bytes() if args.image else sample_png()
    data_uri = "data:image/png;base64," + base64.b64encode(image).decode()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    start = time.perf_counter()
    first = None
    usage = None  # only when the server sends a usage chunk (stream_options.include_usage)
    stream = client.chat.completions.create(
        model="glm-4.6v-flash",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": args.prompt},
                    {"type": "image_url", "image_url": {"url": data_uri}},
                ],
            }
        ],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            usage = chunk.usage
    total = time.perf_counter() - start
    tokens = (
        f"{usage.completion_tokens} tokens, prompt {usage.prompt_tokens} tokens"
        if usage is not None
        else "no usage chunk arrived"
    )
    print(f"\n\n[{tokens}; first text after {(first or start) - start:.3f} s, all in {total:.3f} s]")


if __name__ == "__main__":
    main()
