"""python -m unclip.serve: OpenAI's Images API (DALL-E 2) and the editor over a trained stack.

    python -m unclip.serve --stack runs/demo                      # http://127.0.0.1:8000/ (the editor)
    python -m unclip.serve --stack runs/ --api-key secret --port 8080
    UNCLIP_API_KEY=secret python -m unclip.serve --stack runs/demo --host 0.0.0.0

It binds 127.0.0.1 unless told otherwise: from a laptop, reach a cluster node's server through an SSH
tunnel (ssh -L 8000:localhost:8000 node) rather than opening the port.
"""

from __future__ import annotations

import argparse
import os
import sys

from unclip.safety import DEFAULT_BLOCKLIST, PromptFilter
from unclip.sample_args import stack_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unclip.serve", description=__doc__.split("\n\n")[0])
    stack_arguments(p)
    net = p.add_argument_group("serving")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    net.add_argument("--api-key", default=os.environ.get("UNCLIP_API_KEY"), help="require 'Authorization: Bearer KEY' "
                     "(default: $UNCLIP_API_KEY; none: no key)")  # fmt: skip
    net.add_argument("--model-name", default="unclip", help="the model id /v1/models lists (default unclip)")
    net.add_argument("--queue", type=int, default=16, help="requests that may wait; more get 503 (default 16)")
    net.add_argument("--max-batch", type=int, default=16, help="images generated together (default 16)")
    net.add_argument("--max-upload-mb", type=float, default=4.0, help="largest uploaded PNG (default 4, as OpenAI)")
    run = p.add_argument_group("running")
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU when there is one)")
    run.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    run.add_argument("--no-watermark", action="store_true", help="skip the invisible watermark")
    run.add_argument("--blocklist", default=str(DEFAULT_BLOCKLIST), help="words and re: patterns to refuse")
    run.add_argument("--no-prompt-filter", action="store_true", help="turn the prompt filter off")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from unclip.serve.app import create_app
    except ImportError as e:
        print(f"error: serving needs the serve extra (pip install -e '.[serve]'): {e}", file=sys.stderr)
        return 1
    from unclip.pipeline import Pipeline
    from unclip.sample import stack_paths

    try:
        paths = stack_paths(args)
        prompt_filter = None if args.no_prompt_filter else PromptFilter.from_file(args.blocklist)
        pipe = Pipeline.from_exports(
            **paths, device=args.device, precision=args.precision, progress=False, prompt_filter=prompt_filter
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app = create_app(
        pipe,
        api_key=args.api_key,
        model_name=args.model_name,
        capacity=args.queue,
        max_images=args.max_batch,
        max_upload_mb=args.max_upload_mb,
        watermark=not args.no_watermark,
    )
    print(f"serving {args.model_name} ({', '.join(sorted(paths))}) on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
