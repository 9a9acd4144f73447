"""Decode throughput of the model itself, batched: GLM-4.6V-Flash's real dimensions on a GPU
(``--full-size``), or the tiny random model on the CPU (``--tiny``, to check this script here).

    python bench/engine_throughput.py --full-size [--batches 1,8,32] [--new-tokens 256] [--out FILE.json]
    .venv/bin/python bench/engine_throughput.py --tiny

``--full-size`` builds a randomly initialised ``Glm4vForConditionalGeneration`` with the published
dimensions of zai-org/GLM-4.6V-Flash (below; no download, nothing read from a hub) directly on the
GPU in bfloat16, then for each batch size decodes ``--new-tokens`` tokens per row for a 448x448
image and a short question (every row the same conversation), and prints:

  * ``transformers``: ``model.generate`` alone (greedy), the ceiling of what the engine can get
    from transformers;
  * ``sightline engine``: the same batch through ``inference.engine.Engine.generate_batch`` (the
    per-row sampler, stop checks and streaming a worker runs), when it runs on this machine's
    transformers;

each with the prefill time (the first token), decode tokens/s over all rows (tokens after the
first, divided by the time after the first), per row, and the peak GPU memory; and the bandwidth
bound: one decoding step reads every decoder weight once, so a single stream cannot beat
memory bandwidth / decoder weight bytes (H200: 4.8 TB/s; ``--bandwidth-tbs``). Random weights:
the answers are noise, but the arithmetic and memory traffic are the real model's.

It imports no Django: it needs torch, transformers and this repository only. Without a CUDA GPU
``--full-size`` stops with a message; ``--tiny`` runs anywhere.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# zai-org/GLM-4.6V-Flash's config.json (architecture Glm4vForConditionalGeneration, the GLM-4.1V-9B
# layout: 40 decoder layers 4096 wide, grouped-query attention with 2 key/value heads, half-rotary
# multimodal rope; a 24-layer ViT 1536 wide, patches of 14, 2x2 merged into the decoder's width).
# The special-token ids are the tiny tokenizer's (the vocabulary size is the real one): ids only
# name tokens, they cost nothing.
FULL_TEXT = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "attention_bias": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 500000.0,
        "mrope_section": [8, 12, 12],
        "partial_rotary_factor": 0.5,
    },
}
FULL_VISION = {
    "depth": 24,
    "hidden_size": 1536,
    "intermediate_size": 13696,
    "num_heads": 12,
    "out_hidden_size": 4096,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "image_size": 336,
    "in_channels": 3,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
}
PROMPT = "What is in this picture?"
GIB = 1024**3


def full_size_model(tokenizer):
    """The random full-size model, built on the GPU in bfloat16 (no CPU copy, no download)."""
    import torch
    from transformers import GenerationConfig, Glm4vConfig, Glm4vForConditionalGeneration

    from inference.engine.tiny_model import EOS_TOKENS, SPECIAL_TOKENS

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Glm4vConfig(
        text_config={**FULL_TEXT, "pad_token_id": ids["<|endoftext|>"]},
        vision_config=FULL_VISION,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Glm4vForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16).eval()
    eos = [ids[token] for token in EOS_TOKENS]
    # Random weights would stop anywhere: suppress the stop and special tokens so every row decodes
    # exactly --new-tokens tokens (as the tiny model's generation config does).
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=eos[0], suppress_tokens=sorted(set(ids.values()))
    )
    return model


def full_size_processor(tokenizer):
    """A processor of GLM-4.6V-Flash's image geometry (448x448 stays 448x448: 256 image tokens)."""
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    from inference.engine.tiny_model import CHAT_TEMPLATE

    size = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 15000}
    vision = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    return Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size, **vision),
        video_processor=Glm4vVideoProcessor(size=size, **vision),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def hand_built_inputs(model, tokenizer, batch: int, image_side: int, device: str) -> dict:
    """What the processor makes of one image and the question, built directly: the chat template's
    text with one image placeholder per merged patch, random pixel patches and their grid."""
    import torch

    vision = model.config.vision_config
    grid = image_side // vision.patch_size
    merged = (grid // vision.spatial_merge_size) ** 2
    text = (
        "[gMASK]<sop><|user|>\n<|begin_of_image|>" + "<|image|>" * merged + "<|end_of_image|>"
        f"{PROMPT}/nothink<|assistant|>\n<think></think>\n"
    )
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)] * batch, device=device)
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    dtype = next(model.parameters()).dtype
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch * grid * grid, patch, device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, device=device),
    }


def adopt(engine, processor, model) -> None:
    """Give an ``Engine`` a model built here, as ``Engine._load`` sets one up from a folder."""
    config = model.generation_config
    eos = config.eos_token_id
    engine.processor = processor
    engine.model = model
    engine.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
    engine.vocab_size = int(model.config.get_text_config().vocab_size)
    engine.pad_token_id = config.pad_token_id if isinstance(config.pad_token_id, int) else min(engine.eos_token_ids)
    engine.sampling_defaults = {}


class Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


def measure(run, batch: int, new_tokens: int, clock: Clock, cuda: bool) -> dict:
    """``run(max_new_tokens)`` once with 1 token (prefill + first token) and once with all; the
    decode rate is the extra tokens over the extra time."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = clock.now()
    run(1)
    prefill = clock.now() - start
    start = clock.now()
    produced, prompt_tokens = run(new_tokens)
    total = clock.now() - start
    decode = max(total - prefill, 1e-9)
    figures = {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "tokens_out": produced,
        "prefill_s": round(prefill, 4),
        "total_s": round(total, 4),
        "decode_tokens_per_s": round(batch * (new_tokens - 1) / decode, 1),
        "decode_tokens_per_s_per_row": round((new_tokens - 1) / decode, 1),
    }
    if cuda:
        figures["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--full-size", action="store_true", help="GLM-4.6V-Flash's dimensions, random, on a CUDA GPU")
    size.add_argument("--tiny", action="store_true", help="the tiny random model on the CPU (a check of this script)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="memory bandwidth for the bound (H200: 4.8)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (--tiny: 1 unless told; see below)")
    parser.add_argument("--skip-engine", action="store_true", help="only model.generate, not Sightline's engine")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    batches = [int(value) for value in args.batches.split(",") if value.strip()]

    import torch
    import transformers

    cuda = bool(args.full_size)
    if args.threads or not cuda:
        # On a small shared CPU, torch's threads waiting for each other while other processes hold the
        # cores make a run 10x slower at random; one thread gives figures that mean something.
        torch.set_num_threads(args.threads or 1)
    if args.full_size and not torch.cuda.is_available():
        sys.exit(
            "--full-size needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}). Run it on a GPU machine, or --tiny here."
        )
    from PIL import Image

    from inference.engine import Engine, EngineRequest, SamplingParams
    from inference.engine.tiny_model import _tokenizer, build_tiny_model

    device = "cuda" if cuda else "cpu"
    report = {
        "model": "GLM-4.6V-Flash dimensions, random bf16" if cuda else "tiny random GLM-4V, float32",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "image": f"{args.image_side}x{args.image_side}",
        "torch_threads": torch.get_num_threads(),
        "runs": [],
    }
    started = time.perf_counter()
    if cuda:
        tokenizer = _tokenizer()
        model = full_size_model(tokenizer)
        report["build_s"] = round(time.perf_counter() - started, 1)
        engine = Engine("random GLM-4.6V-Flash dimensions", device="cuda", dtype="bfloat16")
        try:
            adopt(engine, full_size_processor(tokenizer), model)
        except Exception as exc:  # noqa: BLE001 - the transformers figures still come
            report["engine_error"] = f"processor: {type(exc).__name__}: {exc}"
            engine = None
    else:
        folder = build_tiny_model(Path(tempfile.mkdtemp(prefix="engine-throughput-")) / "tiny-glm4v")
        engine = Engine.load(str(folder), device="cpu")
        model, tokenizer = engine.model, engine.processor.tokenizer
        report["build_s"] = round(time.perf_counter() - started, 1)

    # What one decoding step reads: every decoder layer, the final norm and lm_head (of the input
    # embeddings only the rows of this step's tokens; of the vision tower nothing).
    text = model.model.language_model
    embeddings = {id(p) for p in text.embed_tokens.parameters()}
    decoder_bytes = sum(p.numel() * p.element_size() for p in text.parameters() if id(p) not in embeddings)
    decoder_bytes += sum(p.numel() * p.element_size() for p in model.lm_head.parameters())
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = args.bandwidth_tbs * 1e12 / decoder_bytes
    report.update(
        parameters=sum(p.numel() for p in model.parameters()),
        weight_bytes=all_bytes,
        decoder_weight_bytes=decoder_bytes,
        bound_tokens_per_s_per_stream=round(bound, 1),
    )
    if cuda:
        report["weights_gib_on_gpu"] = round(torch.cuda.memory_allocated() / GIB, 2)
    print(
        f"{report['model']} on {report['device']} (torch {torch.__version__}, {torch.get_num_threads()} CPU "
        f"threads, transformers {transformers.__version__}): {report['parameters'] / 1e6:,.1f} M parameters, "
        f"{all_bytes / 1e6:,.1f} MB of weights ({decoder_bytes / 1e6:,.1f} MB read per decoding step: decoder "
        f"layers and lm_head), built in {report['build_s']} s",
        flush=True,
    )

    clock = Clock(cuda)
    picture = Image.effect_noise((args.image_side, args.image_side), 64).convert("RGB")

    def raw(batch):
        inputs = hand_built_inputs(model, tokenizer, batch, args.image_side, device)

        def run(max_new_tokens):
            with torch.inference_mode():
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
                )
            prompt = int(inputs["input_ids"].shape[1])
            return int(out.shape[1] - prompt), prompt

        return run

    def through_engine(batch):
        def run(max_new_tokens):
            request = EngineRequest(
                messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                images=[picture],
                sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
            )
            results = engine.generate_batch([request] * batch)
            return min(r.completion_tokens for r in results), max(r.prompt_tokens for r in results)

        return run

    paths = [("transformers", raw)]
    if engine is not None and not args.skip_engine:
        paths.append(("sightline engine", through_engine))
    raw(1)(2)  # warm up: kernels, allocator
    print(
        f"\n{'path':<18} {'batch':>5} {'prompt':>6} {'prefill s':>10} {'decode tok/s':>13} {'per row':>8}"
        f" {'total s':>8} {'peak GiB':>9}  (bound at {args.bandwidth_tbs} TB/s: {bound:.0f} tok/s per stream)",
        flush=True,
    )
    for name, make in paths:
        for batch in batches:
            try:
                figures = {"path": name, **measure(make(batch), batch, args.new_tokens, clock, cuda)}
            except Exception as exc:  # noqa: BLE001 - say so and go on with the next
                figures = {"path": name, "batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"{name:<18} {batch:>5}  failed: {figures['error']}", flush=True)
                report["runs"].append(figures)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            report["runs"].append(figures)
            peak = f"{figures['peak_gpu_gib']:9.2f}" if "peak_gpu_gib" in figures else f"{'-':>9}"
            print(
                f"{name:<18} {batch:>5} {figures['prompt_tokens']:>6} {figures['prefill_s']:10.3f} "
                f"{figures['decode_tokens_per_s']:13.1f} "
                f"{figures['decode_tokens_per_s_per_row']:8.1f} {figures['total_s']:8.2f} {peak}"
                + ("" if figures["tokens_out"] == args.new_tokens else f"  ({figures['tokens_out']} tokens out)"),
                flush=True,
            )
    if "engine_error" in report:
        print(f"sightline engine: not run ({report['engine_error']})")
    print(
        f"\nbandwidth bound: {args.bandwidth_tbs} TB/s / {decoder_bytes / 1e6:,.1f} MB of decoder weights = "
        f"{bound:.0f} tokens/s for one stream; a batch of B reads the weights once per step for B tokens"
        + ("" if cuda else " (a GPU figure: the tiny model on a CPU is nowhere near it)")
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
