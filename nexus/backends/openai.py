"""The OpenAI-compatible dialect: vLLM, llama.cpp, LM Studio, exo, generic servers, OpenAI itself.

Bodies go through as bytes. The only types that differ are in their ``Profile``: how a model's
context length and capabilities are learnt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson

from ..errors import UpstreamProtocolError
from ..registry import Backend, Model
from .base import (
    Call,
    Completion,
    HTTPAdapter,
    Probe,
    StartedStream,
    encode_request,
    parse_json,
)
from .capabilities import guess_model
from .sse import SSEStream


@dataclass(frozen=True, slots=True)
class Profile:
    # Servers that honour ``response_format`` for every model they serve.
    json_mode: bool
    # Ask llama.cpp's /props for the running context size and vision support.
    llamacpp_props: bool = False
    # Servers known to take ``stream_options``: a stream's usage is asked for when the client
    # did not ask (and hidden from it). Unknown servers may refuse the field.
    stream_usage: bool = False
    # Takes ``reasoning_effort`` (OpenAI's API): a client of another API that asked for an
    # effort has it sent here; other servers are not sent it.
    reasoning_effort: bool = False


PROFILES = {
    "vllm": Profile(json_mode=True, stream_usage=True),
    "llamacpp": Profile(json_mode=True, llamacpp_props=True, stream_usage=True),
    "lmstudio": Profile(json_mode=True, stream_usage=True),
    "exo": Profile(json_mode=False),
    "generic": Profile(json_mode=False),
    "openai": Profile(json_mode=False, stream_usage=True, reasoning_effort=True),
}

_GENERIC = PROFILES["generic"]

# Fields of a /v1/models entry that carry a context length, by server.
_CONTEXT_KEYS = ("max_model_len", "context_length", "context_window", "max_context_length")


class OpenAIAdapter(HTTPAdapter):
    def headers(self, backend: Backend) -> dict[str, str]:
        return {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}

    async def probe(self, backend: Backend) -> Probe:
        data = await self.get_json(backend, "/v1/models", self.headers(backend))
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise UpstreamProtocolError(
                backend.name, f"Backend '{backend.name}' sent a model list without 'data'"
            )
        profile = PROFILES.get(backend.type, PROFILES["generic"])
        props = await self._llamacpp_props(backend) if profile.llamacpp_props else {}
        models = []
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                models.append(_model_from_entry(backend.type, profile, entry, props))
        slots = props.get("total_slots")
        return Probe(models, slots if isinstance(slots, int) and slots > 0 else None)

    async def chat(self, backend: Backend, call: Call) -> Completion:
        call = _with_effort(backend, call)
        body = await self.post_json(backend, "/v1/chat/completions", call.payload(), call.headers)
        return complete_response(backend, body)

    async def open_stream(self, backend: Backend, call: Call) -> StartedStream:
        call = _with_effort(backend, call)
        idle = self.timeouts.stream_idle
        payload = None
        if not call.include_usage and PROFILES.get(backend.type, _GENERIC).stream_usage:
            payload = usage_payload(call)
        if payload is None:  # the client's stream as the backend sends it
            return await self.open_events(
                backend,
                "/v1/chat/completions",
                call.payload(),
                call.headers,
                lambda resp: SSEStream(backend, resp, idle),
            )
        return await self.open_events(
            backend,
            "/v1/chat/completions",
            payload,
            call.headers,
            lambda resp: UsageHidingStream(backend, resp, idle),
        )

    async def embeddings(self, backend: Backend, call: Call) -> Completion:
        body = await self.post_json(backend, "/v1/embeddings", call.payload(), call.headers)
        return embeddings_response(backend, body)

    async def _llamacpp_props(self, backend: Backend) -> dict[str, Any]:
        try:
            props = await self.get_json(backend, "/props", self.headers(backend))
        except Exception:  # /props is optional extra detail; the model list is what counts
            return {}
        return props if isinstance(props, dict) else {}


def _model_from_entry(
    backend_type: str, profile: Profile, entry: dict[str, Any], props: dict[str, Any]
) -> Model:
    guess = guess_model(entry["id"], backend_type)
    context = _context_length(entry, props)
    vision = guess.vision or bool((props.get("modalities") or {}).get("vision"))
    # llama.cpp says whether the model's chat template takes tools; one that does not answers a
    # request with tools as if there were none, so that "no" is the server's word, not a guess.
    caps = props.get("chat_template_caps")
    template_tools = caps.get("supports_tools") if isinstance(caps, dict) else None
    told = isinstance(template_tools, bool)
    tools = template_tools if isinstance(template_tools, bool) else guess.tools
    return Model(
        id=entry["id"],
        context_length=context if context is not None else guess.context_length,
        vision=vision,
        tools=tools,
        json_mode=profile.json_mode or guess.json_mode,
        embeddings=guess.embeddings,
        reported=told,
    )


def _context_length(entry: dict[str, Any], props: dict[str, Any]) -> int | None:
    for key in _CONTEXT_KEYS:
        value = entry.get(key)
        if isinstance(value, int) and value > 0:
            return value
    settings = props.get("default_generation_settings")
    if isinstance(settings, dict) and isinstance(settings.get("n_ctx"), int):
        return int(settings["n_ctx"])
    meta = entry.get("meta")
    if isinstance(meta, dict):
        for key in ("n_ctx", "n_ctx_train"):
            if isinstance(meta.get(key), int):
                return int(meta[key])
    return None


def complete_response(backend: Backend, body: bytes) -> Completion:
    """Check a chat completion and make it spec-complete without losing any field.

    OpenAI's schema requires ``message.refusal`` and ``choices[].logprobs`` (nullable); many
    servers omit them. They are added as ``null``; the bytes are re-encoded only then.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(
            backend.name, f"Backend '{backend.name}' sent invalid JSON: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise UpstreamProtocolError(backend.name, f"Backend '{backend.name}' sent a non-object")
    changed = False
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if "logprobs" not in choice:
            choice["logprobs"] = None
            changed = True
        message = choice.get("message")
        if isinstance(message, dict) and "refusal" not in message:
            message["refusal"] = None
            changed = True
    usage = data.get("usage")
    return Completion(
        orjson.dumps(data) if changed else body, usage if isinstance(usage, dict) else None
    )


def embeddings_response(backend: Backend, body: bytes) -> Completion:
    """Check an embeddings answer (a JSON object with a ``data`` list); the bytes go on as they
    came."""
    data = parse_json(backend, body)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UpstreamProtocolError(
            backend.name, f"Backend '{backend.name}' sent an embeddings answer without 'data'"
        )
    usage = data.get("usage")
    return Completion(body, usage if isinstance(usage, dict) else None)


def _with_effort(backend: Backend, call: Call) -> Call:
    """A request from another API (an agent's), adapted to this server: its reasoning effort
    where the server takes it, and a ``max_tokens`` no larger than what the context leaves."""
    if call.inbound is None:
        return call
    if PROFILES.get(backend.type, _GENERIC).reasoning_effort:
        call = call.with_reasoning_effort()
    return _fitted(backend, call)


# Agents ask for the most any model gives (Claude Code: max_tokens 32000); a server whose
# context cannot hold the prompt plus that much refuses the whole request. The prompt is bounded
# by a token per three bytes of the request (tools and system prompts included).
BYTES_PER_TOKEN_BOUND = 3
FIT_MARGIN = 256
MIN_FITTED = 256


def _fitted(backend: Backend, call: Call) -> Call:
    model = backend.models.get(call.model)
    context = model.context_length if model is not None else None
    limit = call.body.get("max_tokens")
    if not context or type(limit) is not int:
        return call
    room = context - len(call.raw) // BYTES_PER_TOKEN_BOUND - FIT_MARGIN
    if limit <= room or room < MIN_FITTED:  # fits; or so little room that the server says why
        return call
    body = {**call.body, "model": call.model, "max_tokens": room}
    return replace(call, body=body, raw=encode_request(body))


# --- a stream's usage, asked for and hidden from the client ----------------------------------

_ASK_USAGE = b'"stream_options":{"include_usage":true},'
# How servers write the ``"usage": null`` that OpenAI adds to every chunk once usage is asked
# for, each with the separator that goes with it.
_NULL_USAGE = (
    b',"usage":null',
    b'"usage":null,',
    b', "usage": null',
    b'"usage": null, ',
    b',"usage": null',
    b'"usage": null,',
)


def usage_payload(call: Call) -> bytes | None:
    """The request with ``stream_options.include_usage`` set, for a client that did not set it.

    The client's bytes get the field spliced in after their opening brace (no re-encoding);
    a body that names ``stream_options`` already is re-encoded instead (a second key would be
    ambiguous), as is one whose model name changes anyway. None: ``stream_options`` is not an
    object, which the backend refuses as the client sent it.
    """
    body = call.body
    if "stream_options" in body:
        options = body["stream_options"]
        if options is not None and not isinstance(options, dict):
            return None
        asked = {**(options or {}), "include_usage": True}
        return encode_request({**body, "model": call.model, "stream_options": asked})
    if body.get("model") != call.model:
        asked = {"include_usage": True}
        return encode_request({**body, "model": call.model, "stream_options": asked})
    raw = call.raw
    brace = raw.find(b"{") + 1
    return raw[:brace] + _ASK_USAGE + raw[brace:]


def hide_null_usage(event: bytes) -> bytes:
    """``event`` without the ``"usage": null`` that asking for usage added to it."""
    for pattern in _NULL_USAGE:
        if pattern in event:
            return event.replace(pattern, b"", 1)
    return event


class UsageHidingStream(SSEStream):
    """The stream of a backend asked for usage that the client did not ask for: the usage-only
    chunk is kept (``keep_usage``) and not relayed, and the ``"usage": null`` of other chunks
    goes, so that the client reads what it would have read had usage not been asked for.
    Events without ``"usage"`` cost one bytes search."""

    def passing(self, events: list[bytes]) -> list[bytes]:
        kept: list[bytes] | None = None  # a new list only once an event changes
        for index, event in enumerate(events):
            if b'"usage"' in event:
                if kept is None:
                    kept = events[:index]
                hidden = self._hide_one(event)
                if hidden is not None:
                    kept.append(hidden)
            elif kept is not None:
                kept.append(event)
        return events if kept is None else kept

    def _hide_one(self, event: bytes) -> bytes | None:
        hidden = event.replace(b',"usage":null', b"", 1)  # OpenAI's own spelling, tried first
        if len(hidden) != len(event):
            return hidden
        if b'"usage":null' in event or b'"usage": null' in event:
            return hide_null_usage(event)
        try:
            chunk = orjson.loads(event[event.index(b"{") :])
        except (ValueError, orjson.JSONDecodeError):
            return event
        usage = chunk.get("usage") if isinstance(chunk, dict) else None
        if not isinstance(usage, dict):
            return event
        self.keep_usage(usage)
        # The usage-only chunk goes; a chunk with choices that carries usage anyway (a server
        # that always sends it) went to the client before, and still does.
        return event if chunk.get("choices") else None
