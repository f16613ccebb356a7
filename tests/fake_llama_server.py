"""A stand-in for llama.cpp's ``llama-server`` binary: takes its command line, serves its API.

Used to test managed backends (start, readiness, restart after a crash, stop) without the real
build. Run as ``python tests/fake_llama_server.py --model M --alias A --port P ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from aiohttp import web


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--alias")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--embeddings", action="store_true")
    p.add_argument("--pooling")
    p.add_argument("--chat-template-file", type=Path)
    p.add_argument("--load-seconds", type=float, default=0.3)  # 503 on /health meanwhile
    args, _ = p.parse_known_args(argv)
    return args


def app(args: argparse.Namespace) -> web.Application:
    name = args.alias or Path(args.model).stem
    ready_at = time.monotonic() + args.load_seconds

    async def health(request: web.Request) -> web.Response:
        if time.monotonic() < ready_at:
            return web.json_response({"error": {"message": "Loading model"}}, status=503)
        return web.json_response({"status": "ok"})

    async def models(request: web.Request) -> web.Response:
        entry = {"id": name, "object": "model", "meta": {"n_ctx_train": 8192}}
        return web.json_response({"object": "list", "data": [entry]})

    props_body: dict[str, object] = {
        "default_generation_settings": {"n_ctx": args.ctx_size // args.parallel},
        "total_slots": args.parallel,
    }
    if args.chat_template_file:  # as llama-server reads a template: does it render tool calls?
        template = args.chat_template_file.read_text()
        takes_tools = "<tool_call>" in template
        props_body["chat_template"] = template
        props_body["chat_template_caps"] = {"supports_tools": takes_tools}

    async def props(request: web.Request) -> web.Response:
        return web.json_response(props_body)

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        message = {"role": "assistant", "content": f"pid {os.getpid()} says hi"}
        return web.json_response(
            {
                "id": "chatcmpl-fake-llama",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", name),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            }
        )

    application = web.Application()
    application.add_routes(
        [
            web.get("/health", health),
            web.get("/v1/models", models),
            web.get("/props", props),
            web.post("/v1/chat/completions", chat),
        ]
    )
    return application


def main() -> None:
    args = parse(sys.argv[1:])
    if not Path(args.model).is_file():
        sys.stderr.write(f"error: failed to open model {args.model}\n")
        sys.exit(1)
    asyncio.set_event_loop(asyncio.new_event_loop())
    web.run_app(app(args), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
