"""Hypothesis strategies for hostile HTTP requests to every route of Nexus.

A ``Req`` is the exact bytes to send, except two placeholders filled in at send time:
``{PORT}`` (Nexus's port, in Host and Origin values) and ``{FAKE}`` (the OpenAI fake's URL, in
admin bodies). Bodies are hostile JSON (wrong types, unknown keys, control characters, unicode,
deep nesting, NaN, huge numbers), broken JSON and raw bytes; headers vary Host, Origin,
Content-Type, forwarding headers, upgrades and odd names; methods and query strings vary too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

# --- names the fuzzed gateway is configured with (tests/fuzz/test_fuzz_routes.py) ---------------
CONFIGURED_BACKENDS = ("fuzz-openai", "fuzz-ollama")
MODELS = ("mock-model", "nomic-embed-text", "llama3.2", "llama3.2:latest")
ALIASES = {"alias-model": "mock-model", "alias-llama": "llama3.2:latest"}

# Host values: this server's names (any port), names of another site, and oddities.
OWN_HOSTS = (
    "127.0.0.1:{PORT}",
    "localhost:{PORT}",
    "127.0.0.1",
    "localhost",
    "[::1]:{PORT}",
    "LOCALHOST:{PORT}",
    "localhost.:{PORT}",
)
FOREIGN_HOSTS = (
    "evil.example",
    "evil.example:{PORT}",
    "127.0.0.1.nip.io:{PORT}",
    "localhost.evil.example",
    "attacker.test:80",
    "[::2]:{PORT}",
    "10.0.0.1:{PORT}",
)
ODD_HOSTS = ("", " ", "127.0.0.1:{PORT}, evil.example", "[::1", "127.0.0.1:99999", "@evil")
OWN_ORIGINS = ("http://127.0.0.1:{PORT}", "http://localhost:{PORT}")
FOREIGN_ORIGINS = (
    "http://evil.example",
    "https://evil.example:{PORT}",
    "null",
    "http://127.0.0.1:1",
    "https://127.0.0.1:{PORT}",
    "http://localhost.evil.example:{PORT}",
)
# The types a page may POST without a CORS preflight: never enough to change anything.
SIMPLE_TYPES = (
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
)
JSON_TYPES = ("application/json", "application/json; charset=utf-8", "APPLICATION/JSON")
ODD_TYPES = ("", "application/jsonx", "application/json, text/plain", "*/*", "application/j\xe9son")
FORWARDING = ("forwarded", "x-forwarded-for", "x-real-ip")
METHODS = (
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PROPFIND",
    "get", "FOO", "M-SEARCH",
)  # fmt: skip


@dataclass
class Req:
    route: str  # the route template this request is aimed at ("*" for unknown paths)
    method: str
    target: str  # path and query, sent as they are (placeholders aside)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False  # send the body with Transfer-Encoding: chunked

    def __repr__(self) -> str:  # hypothesis prints failing examples; keep huge bodies short
        body = (
            self.body
            if len(self.body) <= 300
            else self.body[:300] + b"...(%d bytes)" % len(self.body)
        )
        return (
            f"Req(route={self.route!r}, method={self.method!r}, target={self.target[:300]!r}, "
            f"headers={[(n, v[:200]) for n, v in self.headers]!r}, body={body!r}, "
            f"chunked={self.chunked})"
        )

    def header(self, name: str) -> str | None:
        """The last value sent for ``name`` (what a server that keeps one would see)."""
        found = None
        for key, value in self.headers:
            if key.lower() == name:
                found = value
        return found

    def has(self, name: str) -> bool:
        return any(key.lower() == name for key, _ in self.headers)

    @property
    def foreign_host(self) -> bool:
        hosts = [value for key, value in self.headers if key.lower() == "host"]
        return bool(hosts) and all(host in FOREIGN_HOSTS for host in hosts)

    @property
    def foreign_origin(self) -> bool:
        origin = self.header("origin")
        return origin is not None and origin in FOREIGN_ORIGINS

    @property
    def simple_type(self) -> bool:
        kind = self.header("content-type")
        return kind is not None and kind in SIMPLE_TYPES


# --- weights -------------------------------------------------------------------------------------
# ``a | b`` draws each branch alike, so a request hostile in every part would rarely get past the
# first check. Each part is hostile on its own, about one draw in four: many requests then reach
# the router, the adapters and the upstreams with something odd in them.
def mostly(draw: st.DrawFn) -> bool:
    """True in about three draws of four."""
    return draw(st.sampled_from([True, True, True, False]))


@st.composite
def usually(draw: st.DrawFn, valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    return draw(valid) if mostly(draw) else draw(hostile)


# --- JSON values ---------------------------------------------------------------------------------
text = st.text(max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**200)
    | st.floats()  # NaN and infinities included: not JSON, encoded anyway
    | text
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


depths = st.sampled_from([64, 200, 254, 255, 256, 512, 1000, 1023, 1024, 1025, 5000, 100_000])
nesting = st.builds(nested, depths | st.integers(1, 3000), st.sampled_from(["list", "dict"]))


def encode(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def json_bodies(draw: st.DrawFn, objects: st.SearchStrategy[Any]) -> bytes:
    """``objects`` encoded, or broken on the way: cut, spliced, prefixed, nested, or not JSON."""
    raw = encode(draw(objects), draw(st.booleans()))
    if mostly(draw):
        return raw
    how = draw(st.sampled_from(["cut", "splice", "bom", "bytes", "empty", "nest", "latin1", "dup"]))
    if how == "cut":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if how == "splice":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "bytes":
        return draw(st.binary(max_size=64))
    if how == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n", b"null", b"[]", b'""', b"0"]))
    if how == "latin1":
        return raw.replace(b'"', b'"\xe9', 1)
    if raw.startswith(b"{") and len(raw) > 2:  # "nest" and "dup" need an object
        extra = b'"nest":' + draw(nesting) if how == "nest" else b'"model":123'
        return b"{" + extra + b"," + raw[1:]
    return raw


# --- request bodies per route --------------------------------------------------------------------
hostile_text = (
    st.sampled_from(["", "\x00", "\r\n\x1b[31mforged\n", "\u202e", "\ud7ff\ufffd", "é" * 50]) | text
)
models = usually(
    st.sampled_from([*MODELS, *ALIASES]),
    st.sampled_from(["unknown-model", " mock-model", "mock-model\n", "m" * 300, "../../etc/pw"])
    | hostile_text
    | json_values,
)
parts = usually(
    st.fixed_dictionaries({"type": st.just("text"), "text": hostile_text})
    | st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries(
                {"url": st.sampled_from(["data:image/png;base64,AAAA", "http://127.0.0.1:1/a"])}
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "input_audio", "x"]) | json_values},
        optional={"text": json_values, "image_url": json_values},
    )
    | json_values,
)
contents = usually(hostile_text, st.none() | st.lists(parts, max_size=3) | json_values)
messages = usually(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": contents}
    ),
    st.fixed_dictionaries(
        {"role": st.sampled_from(["tool", "developer", "function"]) | text | json_values},
        optional={"content": contents, "name": text, "tool_calls": json_values},
    )
    | json_values,
)
tools = st.lists(
    usually(
        st.fixed_dictionaries(
            {
                "type": st.just("function"),
                "function": st.fixed_dictionaries(
                    {"name": text}, optional={"parameters": json_values}
                ),
            }
        ),
        json_values,
    ),
    max_size=2,
)
CHAT_OPTIONS = {
    "stream": (st.booleans(), json_values),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "tools": (tools, json_values),
    "response_format": (
        st.sampled_from([{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}]),
        json_values,
    ),
    "max_tokens": (st.integers(1, 4096), json_values),
    "temperature": (st.floats(0, 2), json_values),
    "n": (st.just(1), json_values),
    "user": (text, json_values),
    "unknown_field": (json_values, json_values),
}


@st.composite
def chat_objects(draw: st.DrawFn) -> Any:
    if not mostly(draw):
        return draw(json_values)
    body: dict[str, Any] = {}
    if mostly(draw) or mostly(draw):
        body["model"] = draw(models)
    if mostly(draw) or mostly(draw):
        body["messages"] = draw(
            usually(st.lists(messages, min_size=1, max_size=3), st.just([]) | json_values)
        )
    for key in draw(st.lists(st.sampled_from(sorted(CHAT_OPTIONS)), max_size=3, unique=True)):
        valid, hostile = CHAT_OPTIONS[key]
        body[key] = draw(usually(valid, hostile))
    return body


@st.composite
def embedding_objects(draw: st.DrawFn) -> Any:
    if not mostly(draw):
        return draw(json_values)
    body: dict[str, Any] = {"model": draw(models)}
    body["input"] = draw(
        usually(
            hostile_text | st.lists(hostile_text, min_size=1, max_size=4),
            st.lists(text | st.integers() | st.lists(st.integers(), max_size=4), max_size=5)
            | st.just([])
            | st.just(["x"] * 2049)
            | json_values,
        )
    )
    if not mostly(draw):
        body[draw(st.sampled_from(["encoding_format", "dimensions", "user"]))] = draw(json_values)
    return body


backend_names = usually(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20),
    st.sampled_from(["fuzz added", "a" * 300, "name\r\nX-Injected: 1", "é", "../etc", ""]) | text,
).filter(lambda name: name not in CONFIGURED_BACKENDS)
# Only loopback addresses and literal IPs: a name would be a DNS query leaving the machine, and
# Nexus's own URL would make it call itself.
backend_urls = usually(
    st.sampled_from(["{FAKE}", "{FAKE}/v1", "http://127.0.0.1:1", "http://[::1]:1"]),
    st.sampled_from(
        [
            "https://127.0.0.1:1",
            "http://user:secret@127.0.0.1:1/",
            "http://127.0.0.1:99999",
            "http://0.0.0.0:1",
            "ftp://127.0.0.1/",
            "javascript:alert(1)",
            "not a url",
            "",
        ]
    )
    | json_values.filter(lambda value: not isinstance(value, str)),
)
ADMIN_OPTIONS = {
    "priority": (st.integers(0, 100), json_values),
    "api_key_env": (st.sampled_from(["PATH", "HOME", "NEXUS_FUZZ_UNSET"]), text | json_values),
    "zone": (st.sampled_from(["open", "restricted", "OPEN"]), json_values),
    "tier": (st.integers(1, 5), json_values),
    "max_concurrent": (st.integers(1, 10), json_values),
    "managed": (json_values, json_values),
    "unknown": (json_values, json_values),
}


@st.composite
def admin_objects(draw: st.DrawFn) -> Any:
    if not mostly(draw):
        return draw(json_values)
    body: dict[str, Any] = {
        "name": draw(usually(backend_names, json_values)),
        "url": draw(backend_urls),
        "type": draw(
            usually(st.sampled_from(["vllm", "ollama", "llamacpp"]), st.sampled_from(
                ["openai", "anthropic", "google", "x", "VLLM", "llama.cpp"]) | json_values)
        ),
    }  # fmt: skip
    for key in draw(st.lists(st.sampled_from(sorted(ADMIN_OPTIONS)), max_size=2, unique=True)):
        valid, hostile = ADMIN_OPTIONS[key]
        body[key] = draw(usually(valid, hostile))
    return body


# --- headers, methods, targets -------------------------------------------------------------------
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60,
)
token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.!#$%&'*+^`|~", min_size=1,
                max_size=20)  # fmt: skip
extra_headers = st.lists(
    st.sampled_from(
        [
            ("Authorization", "Bearer sk-fuzz"),
            ("Authorization", "Basic Zm9vOmJhcg=="),
            ("X-Nexus-Priority", "high"),
            ("X-Nexus-Strict", "true"),
            ("X-Nexus-Flexible", "true"),
            ("X-Request-Id", "fuzz-0001"),
            ("X-Request-Id", "<script>" * 40),
            ("Forwarded", "for=203.0.113.7"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Real-IP", "127.0.0.1"),
            ("Accept", "text/event-stream"),
            ("Accept-Encoding", "gzip, br"),
            ("Connection", "close"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Upgrade", "h2c"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Expect", "100-continue"),
            ("If-None-Match", '"abc"'),
            ("Range", "bytes=0-10"),
            ("Cookie", "a=b"),
        ]
    )
    | st.tuples(st.sampled_from(["Authorization", "X-Request-Id", "Accept", "Cookie"]), header_text)
    | st.tuples(token, header_text)
    | st.tuples(st.just("X-Big"), st.sampled_from([1_000, 20_000, 70_000]).map("v".__mul__)),
    max_size=4,
)


@st.composite
def headers(draw: st.DrawFn, *, body_type: bool) -> list[tuple[str, str]]:
    """Mostly what a well-behaved client sends (so that requests get past the guard and deep into
    the handlers), often a foreign or odd Host, Origin or Content-Type, and a few extra headers."""
    out: list[tuple[str, str]] = []
    if mostly(draw):
        out.append(("Host", "127.0.0.1:{PORT}"))
    else:
        host = draw(
            st.sampled_from(OWN_HOSTS) | st.sampled_from(FOREIGN_HOSTS)
            | st.sampled_from(ODD_HOSTS) | header_text | st.none()
        )  # fmt: skip
        if host is not None:
            out.append(("Host", host))
    if draw(st.integers(0, 19)) == 0:  # a second Host header
        out.append(("Host", draw(st.sampled_from(OWN_HOSTS + FOREIGN_HOSTS))))
    if not mostly(draw):
        origin = draw(st.sampled_from(OWN_ORIGINS) | st.sampled_from(FOREIGN_ORIGINS) | header_text)
        out.append(("Origin", origin))
    if body_type and mostly(draw):
        out.append(("Content-Type", "application/json"))
    else:
        kind = draw(
            st.sampled_from(JSON_TYPES) | st.sampled_from(SIMPLE_TYPES)
            | st.sampled_from(ODD_TYPES) | st.none()
        )  # fmt: skip
        if kind is not None:
            out.append(("Content-Type", kind))
    if not mostly(draw):
        out.extend(draw(extra_headers))
    return out


def query(draw: st.DrawFn) -> str:
    return draw(
        st.just("")
        | st.sampled_from(["?", "?x", "?a=1&b=2", "?%00", "?%ff%fe", "?q=%E2%80%AE", "?=&&="])
        | st.text(alphabet="abc=&%0123456789+;", max_size=20).map("?".__add__)
    )


@st.composite
def requests(
    draw: st.DrawFn,
    route: str,
    paths: st.SearchStrategy[str],
    method: str,
    bodies: st.SearchStrategy[bytes] | None = None,
) -> Req:
    """A request aimed at ``route``: mostly its own method, sometimes any other."""
    verb = method if mostly(draw) or mostly(draw) else draw(st.sampled_from(METHODS))
    body = b""
    if bodies is not None and (verb not in ("GET", "HEAD") or not mostly(draw)):
        body = draw(bodies)
    elif not (mostly(draw) or mostly(draw)):
        body = draw(st.binary(max_size=40))
    target = draw(paths) + (query(draw) if not mostly(draw) else "")
    req = Req(route, verb, target, draw(headers(body_type=bodies is not None)), body)
    req.chunked = bool(body) and not (mostly(draw) or mostly(draw))
    return req


# --- the agent APIs: Anthropic Messages and OpenAI Responses ----------------------------------
blocks = usually(
    st.fixed_dictionaries({"type": st.just("text"), "text": hostile_text})
    | st.fixed_dictionaries(
        {
            "type": st.just("image"),
            "source": st.fixed_dictionaries(
                {
                    "type": st.just("base64"),
                    "media_type": st.just("image/png"),
                    "data": st.just("AAAA"),
                }
            ),
        }
    )
    | st.fixed_dictionaries(
        {
            "type": st.just("tool_use"),
            "id": text,
            "name": text,
            "input": st.dictionaries(text, text, max_size=2),
        }
    )
    | st.fixed_dictionaries(
        {"type": st.just("tool_result"), "tool_use_id": text, "content": hostile_text}
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image", "document", "thinking", "x"]) | json_values},
        optional={"text": json_values, "source": json_values, "input": json_values},
    )
    | json_values,
)
turns = usually(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]),
            "content": usually(hostile_text, st.lists(blocks, max_size=3) | json_values),
        }
    ),
    st.fixed_dictionaries({"role": text | json_values}, optional={"content": json_values})
    | json_values,
)
MESSAGES_OPTIONS = {
    "system": (hostile_text | st.lists(blocks, max_size=2), json_values),
    "stream": (st.booleans(), json_values),
    "tools": (
        st.lists(
            st.fixed_dictionaries(
                {"name": text, "input_schema": st.just({"type": "object"})},
                optional={"description": text, "type": st.just("web_search_20250305")},
            ),
            max_size=2,
        ),
        json_values,
    ),
    "tool_choice": (
        st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}]),
        json_values,
    ),
    "thinking": (st.just({"type": "enabled", "budget_tokens": 2048}), json_values),
    "stop_sequences": (st.lists(text, max_size=2), json_values),
    "temperature": (st.floats(0, 1), json_values),
    "top_k": (st.integers(1, 50), json_values),
    "metadata": (st.fixed_dictionaries({"user_id": text}), json_values),
    "cache_control": (json_values, json_values),
}


@st.composite
def messages_objects(draw: st.DrawFn) -> Any:
    if not mostly(draw):
        return draw(json_values)
    body: dict[str, Any] = {}
    if mostly(draw) or mostly(draw):
        body["model"] = draw(models)
    if mostly(draw) or mostly(draw):
        body["max_tokens"] = draw(usually(st.integers(1, 4096), json_values))
    if mostly(draw) or mostly(draw):
        body["messages"] = draw(usually(st.lists(turns, min_size=1, max_size=3), json_values))
    for key in draw(st.lists(st.sampled_from(sorted(MESSAGES_OPTIONS)), max_size=3, unique=True)):
        valid, hostile = MESSAGES_OPTIONS[key]
        body[key] = draw(usually(valid, hostile))
    return body


items = usually(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "developer", "system"]),
            "content": usually(
                hostile_text,
                st.lists(
                    st.fixed_dictionaries(
                        {"type": st.sampled_from(["input_text", "output_text"]), "text": text}
                    ),
                    max_size=2,
                )
                | json_values,
            ),
        }
    )
    | st.fixed_dictionaries(
        {
            "type": st.just("function_call"),
            "call_id": text,
            "name": text,
            "arguments": st.just("{}") | text,
        }
    )
    | st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": text, "output": hostile_text}
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "reasoning", "item_reference", "x"]) | json_values},
        optional={"content": json_values, "id": json_values},
    )
    | json_values,
)
RESPONSES_OPTIONS = {
    "instructions": (hostile_text, json_values),
    "stream": (st.booleans(), json_values),
    "tools": (
        st.lists(
            st.fixed_dictionaries(
                {"type": st.just("function"), "name": text, "parameters": st.just({})}
            )
            | st.just({"type": "web_search"}),
            max_size=2,
        ),
        json_values,
    ),
    "tool_choice": (st.sampled_from(["auto", "none", "required"]), json_values),
    "max_output_tokens": (st.integers(1, 4096), json_values),
    "text": (st.just({"format": {"type": "json_object"}}), json_values),
    "reasoning": (st.just({"effort": "low"}), json_values),
    "store": (st.booleans(), json_values),
    "previous_response_id": (st.just("resp_unknown"), json_values),
    "include": (st.just(["reasoning.encrypted_content"]), json_values),
}


@st.composite
def responses_objects(draw: st.DrawFn) -> Any:
    if not mostly(draw):
        return draw(json_values)
    body: dict[str, Any] = {}
    if mostly(draw) or mostly(draw):
        body["model"] = draw(models)
    if mostly(draw) or mostly(draw):
        body["input"] = draw(usually(hostile_text, st.lists(items, max_size=3) | json_values))
    keys = st.lists(st.sampled_from(sorted(RESPONSES_OPTIONS)), max_size=3, unique=True)
    for key in draw(keys):
        valid, hostile = RESPONSES_OPTIONS[key]
        body[key] = draw(usually(valid, hostile))
    return body


# --- client keys (issue 12): /admin/keys bodies, names, and credentials ------------------------
FUZZ_KEY = "nx-fuzz-tier-client-key-0123456789abcdefghijklmnop"  # [[auth.keys]] of the keyed target
key_names = usually(
    st.text(alphabet="abcxyz019._-", min_size=1, max_size=12),
    st.sampled_from(["", " ", "a b", "a/b", "..", "x" * 65, "é", "nx-\x00", "fuzz-keyed"]) | text,
)
KEY_OPTIONS = {
    "owner": (text, json_values),
    "expires_at": (
        st.sampled_from(["2099-01-01T00:00:00Z", "2030-06-01T12:00:00+02:00"]),
        st.sampled_from(["2030-01-01T00:00:00", "2020-01-01", "tomorrow", "", "9999-99-99T"])
        | json_values,
    ),
    "models": (
        st.lists(st.sampled_from(["mock-*", "*", "llama*", "alias-model"]), max_size=3),
        st.lists(text, max_size=70) | json_values,
    ),  # fmt: skip
    "max_zone": (st.sampled_from(["open", "restricted", "RESTRICTED"]), json_values),
    "rpm": (st.integers(1, 10**6), st.integers() | json_values),
    "tpm": (st.integers(1, 10**9), st.integers() | json_values),
    "max_concurrent": (st.integers(1, 100), st.integers() | json_values),
    "monthly_budget_usd": (st.floats(0.01, 1000), st.floats() | json_values),
    "name": (key_names, json_values),  # in a PATCH: a rename, refused
    "key": (text, json_values),
    "hash": (st.just("sha256:" + "0" * 64), json_values),
    "unknown": (json_values, json_values),
}


@st.composite
def key_objects(draw: st.DrawFn) -> Any:
    """A ``POST /admin/keys`` or ``PATCH /admin/keys/{name}`` body: mostly a name and up to three
    settings, each usually valid; sometimes any JSON value."""
    if not mostly(draw):
        return draw(json_values)
    body: dict[str, Any] = {}
    if mostly(draw):
        body["name"] = draw(key_names)
    for key in draw(st.lists(st.sampled_from(sorted(KEY_OPTIONS)), max_size=3, unique=True)):
        valid, hostile = KEY_OPTIONS[key]
        body[key] = draw(usually(valid, hostile))
    return body


credentials = st.lists(
    st.sampled_from(
        [
            ("Authorization", f"Bearer {FUZZ_KEY}"),
            ("Authorization", f"bearer {FUZZ_KEY}"),
            ("x-api-key", FUZZ_KEY),
            ("Authorization", f"Bearer {FUZZ_KEY}x"),
            ("Authorization", f"Basic {FUZZ_KEY}"),
            ("Authorization", FUZZ_KEY),
            ("Authorization", "Bearer"),
            ("Authorization", "Bearer nx-wrong"),
            ("x-api-key", FUZZ_KEY[:-1]),
            ("x-api-key", ""),
        ]
    )
    | st.tuples(st.sampled_from(["Authorization", "x-api-key"]), header_text)
    | st.tuples(
        st.just("Authorization"), st.sampled_from([600, 20_000]).map(lambda n: "Bearer " + "k" * n)
    ),
    max_size=2,
)


def carries_the_key(req: Req) -> bool:
    """Whether the request sends the fuzz key as a client may (the only way a keyed route may
    answer 2xx): a bearer token (any case of the scheme) or an ``x-api-key``."""
    for name, value in req.headers:
        scheme, _, token = value.strip().partition(" ")
        if name.lower() == "authorization" and scheme.lower() == "bearer":
            if token.strip() == FUZZ_KEY:
                return True
        elif name.lower() == "x-api-key" and value.strip() == FUZZ_KEY:
            return True
    return False
