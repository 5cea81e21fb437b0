"""The `dgemma` command line: `run` (generate), `info` (what a checkpoint holds), `init` (a random checkpoint).

Owns argument parsing, turning library errors into one-line messages with exit code 2, and printing results
(text on stdout, statistics on stderr, or one JSON object with --json).
Must not: implement generation or loading itself; it calls the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import __version__, checkpoint, quant
from .api import Model, load, load_tokenizer, model_path
from .config import PRESET_NAMES, GenerationSettings, preset
from .model.diffusion_gemma import DiffusionGemma
from .tokenizer import Tokenizer


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, default=None,
                   help="checkpoint directory, Hub repo id or .gguf file" + ("" if required else " (default: the bundled model)"))
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: as stored; a .gguf file's float tensors: float32 on a CPU, bfloat16 "
                        "on a GPU)")
    p.add_argument("--tokenizer", default=None, metavar="DIR_OR_ID",
                   help="use this directory's or Hub repo's tokenizer instead of the checkpoint's own (e.g. for a "
                        ".gguf file whose vocabulary is not read)")


def _port(text: str) -> int:
    """An argparse type: a TCP port number."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 0 to 65535, got {text!r}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="Run DiffusionGemma block-diffusion models.")
    parser.add_argument("--version", action="version", version=f"dgemma {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate a continuation of PROMPT")
    run.add_argument("prompt", help="prompt text (or token ids with --ids)")
    _add_model_args(run, required=False)
    run.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default: checkpoint's)")
    run.add_argument("--steps", type=int, default=None, help="maximum denoising steps per canvas")
    run.add_argument("--entropy-bound", type=float, default=None, help="entropy budget accepted per step")
    run.add_argument("--seed", type=int, default=None, help="random seed for a reproducible output")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    run.add_argument("--thinking", action="store_true", help="with --chat: let the model think first")
    run.add_argument("--ids", action="store_true", help="PROMPT is token ids separated by commas or spaces")
    run.add_argument("--json", action="store_true", help="print one JSON object with text, ids and statistics")

    info = sub.add_parser("info", help="summarise a checkpoint: shapes, parameters, bytes")
    _add_model_args(info, required=True)
    info.add_argument("--json", action="store_true", help="print JSON")

    train = sub.add_parser("train", help="train or fine-tune (see `dgemma train --help`)", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)

    init = sub.add_parser("init", help="write a randomly initialised checkpoint of a named shape")
    init.add_argument("out", help="directory to create")
    init.add_argument("--preset", default="tiny", choices=PRESET_NAMES)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

    qz = sub.add_parser("quantize", help="convert a checkpoint (float, FP8 or .gguf) to int8 or int4 weights")
    qz.add_argument("--model", required=True, help="source checkpoint directory, Hub repo id or .gguf file")
    qz.add_argument("--to", required=True, choices=["int8", "int4"], help="weight format")
    qz.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                    help="inputs per scale for every quantized weight, the embedding's too (int4 default 64; int8 "
                         "default: one scale per output channel)")
    qz.add_argument("--dense", default=None, choices=["int8", "int4"],
                    help="format of the linears outside the experts: attention, dense and self-conditioning MLPs "
                         "(default: the --to format)")
    qz.add_argument("--embedding", default="int8", choices=["int8", "int4", "float"],
                    help="format of the tied embedding / head (default: int8)")
    qz.add_argument("--calibrate", metavar="FILES", nargs="+", default=None,
                    help="text files or globs (** allowed) to calibrate on: rounds the attention, dense and expert "
                         "weights by GPTQ instead of to nearest; loads the whole float model")
    qz.add_argument("--calibration-windows", type=int, default=256, metavar="N",
                    help="calibration windows of two canvases each (default: 256)")
    qz.add_argument("--device", default="cpu", help="device for the calibration passes, e.g. cuda (default: cpu)")
    qz.add_argument("--out", required=True, help="directory to write")
    qz.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval-code", help="infill and completion on held-out standard-library modules")
    _add_model_args(ev, required=False)
    ev.add_argument("--limit", type=int, default=50, help="samples per task (default: 50)")
    ev.add_argument("--seed", type=int, default=0, help="sample selection and sampler seed (default: 0)")
    ev.add_argument("--steps", type=int, default=None, help="maximum denoising steps per canvas")
    ev.add_argument("--max-prefix-tokens", type=int, default=1024, help="prompt cap in tokens (default: 1024)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="completion budget in tokens (default: 128)")
    ev.add_argument("--best-of", type=int, default=4, metavar="N",
                    help="also fill each infill hole N times and keep the fill the model scores most likely with "
                         "the text after it; 1 skips that row (default: 4)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")

    from .bench import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="measure generation speed: tokens/s, ms per step, memory, comparisons")
    add_bench_arguments(bench)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API and a playground over HTTP")
    _add_model_args(serve, required=False)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port, 0..65535 (default: 8000; 0: any free one)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 (default: 64)")
    serve.add_argument("--max-batch", type=int, default=32, help="rows per engine call (default: 32)")
    serve.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask")

    chat = sub.add_parser("chat", help="chat in the terminal, watching each draft refine in place")
    _add_model_args(chat, required=False)
    chat.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (default: checkpoint's)")
    chat.add_argument("--steps", type=int, default=None, help="maximum denoising steps per canvas")
    chat.add_argument("--seed", type=int, default=None, help="random seed for reproducible answers")
    chat.add_argument("--thinking", action="store_true", help="let the model think first (if its template can)")
    return parser


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--ids expects integers separated by commas or spaces, got {text!r}") from None


def cmd_run(args) -> int:
    if args.thinking and not args.chat:
        raise ValueError("--thinking applies to --chat")
    if args.chat and args.ids:
        raise ValueError("--chat takes a text prompt, not --ids")
    model: Model = load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    kw = dict(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps, entropy_bound=args.entropy_bound,
              seed=args.seed)
    start = time.perf_counter()
    reasoning = None
    if args.ids:
        result = model.generate([_parse_ids(args.prompt)], **kw)
        tok = model.tokenizer
        text = tok.decode(result.token_ids[0]) if tok is not None else None
    else:
        if model.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer (no tokenizer.json, or a .gguf vocabulary that is not "
                             "read): pass a tokenizer with --tokenizer DIR_OR_ID, or the prompt as token ids with --ids")
        if args.chat:
            out = model.chat([{"role": "user", "content": args.prompt}], thinking=args.thinking, **kw)
        else:
            out = model.complete(args.prompt, **kw)
        result, text = out.result, out.text[0]
        reasoning = out.reasoning[0] if out.reasoning else None
    seconds = time.perf_counter() - start
    n = len(result.token_ids[0])
    stats = {"tokens": n, "seconds": round(seconds, 3), "tokens_per_second": round(n / seconds, 2),
             "tokens_per_forward": round(result.tokens_per_forward[0], 3), "steps_per_canvas": result.steps[0],
             "finish_reason": result.finish_reasons[0]}
    if args.json:
        print(json.dumps({"text": text, **({"reasoning": reasoning} if reasoning else {}),
                          "token_ids": result.token_ids[0], **stats}))
    else:
        if reasoning:
            print(f"(thinking) {reasoning}", file=sys.stderr)
        print(text if text is not None else " ".join(map(str, result.token_ids[0])))
        print(f"[{n} tokens in {seconds:.2f} s, {stats['tokens_per_second']} tok/s, "
              f"{stats['tokens_per_forward']} tokens/forward, steps per canvas {result.steps[0]}, "
              f"finish: {stats['finish_reason']}]", file=sys.stderr)
    return 0


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _planned_device(name: str | None) -> torch.device:
    """The device `--device` names (default: the CPU), which `info` plans for without needing it here."""
    try:
        return torch.device(name or "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; expected e.g. cpu, cuda or mps") from None


def cmd_info(args) -> int:
    gguf = quant.GGUFFile(args.model) if quant.is_gguf(args.model) else None
    path = gguf.path if gguf else checkpoint.resolve(args.model)
    cfg, settings = (gguf.config, gguf.settings) if gguf else checkpoint.read_config(path)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype) \
        or (quant.gguf_dtype(_planned_device(args.device)) if gguf else checkpoint.stored_dtype(path))
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    weight_bytes = sum(t.numel() for t in net.state_dict().values()) * dtype.itemsize
    total, active = cfg.parameter_counts()
    kinds = {k: cfg.layer_types.count(k) for k in sorted(set(cfg.layer_types))}
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer, cfg.vocab_size)
    else:
        tok = gguf.tokenizer() if gguf else Tokenizer.from_dir(path)
    data = {
        "path": str(path), "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers, "layer_types": kinds, "attention_heads": cfg.num_attention_heads,
        "head_dims": sorted(set(cfg.layer_head_dims)), "kv_heads": sorted(set(cfg.layer_kv_heads)),
        "experts": cfg.num_experts, "top_k_experts": cfg.top_k_experts, "sliding_window": cfg.sliding_window,
        "canvas_length": cfg.canvas_length, "total_parameters": total, "active_parameters": active,
        "dtype": str(dtype).removeprefix("torch."), "weight_bytes": weight_bytes,
        "tokenizer": tok is not None, "chat_template": tok is not None and tok.chat_template is not None,
        "generation": settings.to_hf_dict(),
    }
    # Quantized, FP8 and GGUF checkpoints: format, resident bytes.
    data.update((gguf.describe(dtype) if gguf else quant.describe(path, dtype)) or {})
    resident = data.get("resident_bytes", weight_bytes)
    data["bytes_per_parameter"] = resident / total
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"model        {path}")
    print(f"shape        {cfg.num_hidden_layers} layers {kinds}, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, head dims {data['head_dims']}, kv heads {data['kv_heads']}")
    print(f"experts      {cfg.num_experts} (top {cfg.top_k_experts}), expert size {cfg.moe_intermediate_size}, "
          f"dense MLP {cfg.intermediate_size}")
    print(f"vocab        {cfg.vocab_size}, canvas {cfg.canvas_length}, sliding window {cfg.sliding_window}")
    print(f"parameters   {_count(total)} total, {_count(active)} active per token")
    print(f"weights      {weight_bytes / 2**30:.3f} GiB ({weight_bytes:,} bytes) in {data['dtype']}")
    if "quantization" in data:
        print(f"quantized    {data['quantization']}: {resident / 2**30:.3f} GiB resident ({resident:,} bytes)")
    print(f"bytes/param  {data['bytes_per_parameter']:.3f}")
    print(f"tokenizer    {'yes' if tok else 'no'}{', chat template' if data['chat_template'] else ''}")
    print(f"generation   {settings.max_denoising_steps} steps, entropy bound {settings.entropy_bound}, "
          f"t {settings.t_max}->{settings.t_min}, max_new_tokens {settings.max_new_tokens}")
    return 0


def cmd_init(args) -> int:
    cfg = preset(args.preset)
    net = DiffusionGemma(cfg).init_weights(args.seed).to({"float32": torch.float32,
                                                         "bfloat16": torch.bfloat16}[args.dtype])
    tok = Tokenizer.byte_level()
    out = checkpoint.save(net, GenerationSettings(), args.out,
                          tokenizer=tok if cfg.vocab_size >= tok.vocab_size else None)
    print(f"wrote random {args.preset} checkpoint to {out}")
    return 0


def _calibrated(args, embedding: str | None) -> dict:
    """GPTQ-rounded weights of `args.model` for `dgemma quantize --calibrate`, on the CPU."""
    import glob
    import random

    from .quant import gptq

    fmt, group, dense = quant.convert.resolve_formats(args.to, args.group_size, args.dense, embedding)
    files = set()
    for pattern in args.calibrate:
        found = {f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)}
        if not found:
            raise ValueError(f"--calibrate {pattern!r} matches no files")
        files |= found
    files = sorted(files)
    model = load(args.model, device=args.device)
    if quant.is_quantized(model.net):
        raise ValueError(f"--calibrate needs float weights; {args.model} is already quantized")
    if model.tokenizer is None:
        raise ValueError(f"--calibrate needs {args.model}'s tokenizer (tokenizer.json)")
    random.Random(0).shuffle(files)
    docs = (model.tokenizer.encode(open(f, encoding="utf-8", errors="replace").read()) for f in files)
    windows = gptq.calibration_windows(docs, args.calibration_windows, 2 * model.config.canvas_length)
    weights = gptq.calibrate(model.net, windows, fmt, group, dense, progress=not args.no_progress)
    return {name: q.map(lambda t: t.cpu()) for name, q in weights.items()}


def cmd_quantize(args) -> int:
    embedding = None if args.embedding == "float" else args.embedding
    checkpoint.check_new_directory(args.out)  # before a long calibration, not after
    calibrated = _calibrated(args, embedding) if args.calibrate else None
    summary = quant.quantize(args.model, args.out, args.to, args.group_size, embedding=embedding,
                             progress=not args.no_progress, dense=args.dense, calibrated=calibrated)
    print(f"wrote {args.to} checkpoint to {summary['out']}: {summary['bytes'] / 2**30:.3f} GiB "
          f"({summary['bytes_per_parameter']:.3f} bytes/parameter, from {summary['source_bytes'] / 2**30:.3f} GiB)")
    return 0


def cmd_train(args) -> int:
    from .train.trainer import main as train_main

    return train_main(args.args)


def cmd_eval_code(args) -> int:
    from .train.eval_code import cmd_eval_code as run

    return run(args)


def cmd_bench(args) -> int:
    from .bench import cmd_bench as run

    return run(args)


def cmd_serve(args) -> int:
    try:
        from .serve.app import serve
    except ImportError as err:
        raise ValueError(f"serving needs the serve extra: pip install 'dgemma[serve]' ({err})") from None
    return serve(model_path(args.model), host=args.host, port=args.port, api_key=args.api_key, device=args.device,
                 dtype=args.dtype, tokenizer=args.tokenizer, max_queue=args.max_queue, max_batch=args.max_batch,
                 max_tokens=args.max_tokens)


def cmd_chat(args) -> int:
    from .serve.chat import chat

    model = load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    return chat(model, sys.stdin, sys.stdout, max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps,
                seed=args.seed, thinking=args.thinking)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its own parser, so `dgemma train --help` and options before CONFIG work
        args = argparse.Namespace(command="train", args=argv[1:])
    else:
        args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run, "info": cmd_info, "init": cmd_init, "quantize": cmd_quantize, "train": cmd_train,
                "eval-code": cmd_eval_code, "serve": cmd_serve, "chat": cmd_chat,
                "bench": cmd_bench}[args.command](args)
    except (ValueError, OSError, ImportError) as err:  # ImportError: an optional extra that is not installed
        print(f"dgemma {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
