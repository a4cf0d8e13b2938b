"""Fast layer, HTTP: random bodies for /v1/completions and /v1/chat/completions through the
OpenAI app (openai_server.build_app: FastAPI's JSON parsing, the pydantic models, the
conversion to SamplingParams, admission through Gateway.submit, the response or its events),
in process over a fake replica (inprocess.py).

Every answer is a 200 (JSON, or server-sent events ending with [DONE]) or an OpenAI error
object: 400 whose `param` is a field the body has (or a required or defaulted one) and whose
message names it, or 404 for another model (param 'model'). Never a 500, never an exception
out of the app, nothing left at the gateway.
"""

from __future__ import annotations

import contextlib
import json
from urllib.parse import quote, unquote

from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz import strategies as fz
from tests.fuzz.common import GATEWAYS, SERVED_NAME, VOCAB, fuzz_settings
from tests.fuzz.inprocess import asgi_call
from tests.fuzz.oracles import check_http_answer

PATHS = {False: "/v1/completions", True: "/v1/chat/completions"}


def post(fake, body, chat: bool, content_type: str | None = "application/json",
         raw: bytes | None = None) -> str:
    """POST `body` (sent as `raw` when given, else as JSON); checks the answer and that nothing
    is left at the gateway."""
    if raw is None:
        raw = json.dumps(body).encode("utf-8", "surrogatepass")
    reply = fake.run(asgi_call(fake.app, "POST", PATHS[chat], raw, content_type))
    fake.run(fake.settle())
    fake.assert_idle()
    outcome = check_http_answer(reply.status, reply.body, body, chat, SERVED_NAME,
                                reply.headers, reply.events or None)
    event(f"{outcome} {reply.status}")  # --hypothesis-show-statistics: how many of each
    return outcome


@fuzz_settings(1000)
@given(which=GATEWAYS, body=fz.http_bodies(SERVED_NAME, VOCAB, chat=False))
def test_any_completion_body(fakes, which, body):
    post(fakes[which], body, chat=False)


@fuzz_settings(900)
@given(which=GATEWAYS, body=fz.http_bodies(SERVED_NAME, VOCAB, chat=False, lean=True))
def test_completion_body_fields(fakes, which, body):
    """Each field mostly valid: what one bad value does among good ones."""
    post(fakes[which], body, chat=False)


@fuzz_settings(700)
@given(which=GATEWAYS, body=fz.http_bodies(SERVED_NAME, VOCAB, chat=True))
def test_any_chat_body(fakes, which, body):
    post(fakes[which], body, chat=True)


@fuzz_settings(600)
@given(which=GATEWAYS, body=fz.http_bodies(SERVED_NAME, VOCAB, chat=True, lean=True))
def test_chat_body_fields(fakes, which, body):
    post(fakes[which], body, chat=True)


@fuzz_settings(300)
@given(chat=st.booleans(), raw=fz.raw_bodies(),
       content_type=st.sampled_from(["application/json", "application/json",
                                     "application/json; charset=utf-8", None, "text/plain"]))
def test_body_that_is_not_an_object(fakes, chat, raw, content_type):
    sent = raw  # what FastAPI validates: bytes, unless the content type says JSON
    if content_type is not None and content_type.startswith("application/json"):
        with contextlib.suppress(ValueError):
            sent = json.loads(raw)
    post(fakes["bytes"], sent, chat, content_type, raw=raw)


@fuzz_settings(200)
@given(name=fz.json_text(16))
def test_model_route(fakes, name):
    """GET /v1/models/{name} for any name (a path as uvicorn decodes it): the model, or a
    404."""
    fake = fakes["bytes"]
    # What uvicorn hands the app: the percent-encoded UTF-8 of the name, decoded (a byte
    # that is not UTF-8, such as a surrogate's, becomes U+FFFD).
    name = unquote(quote(name.encode("utf-8", "surrogatepass")))
    reply = fake.run(asgi_call(fake.app, "GET", f"/v1/models/{name}", content_type=None))
    if name == SERVED_NAME:
        assert reply.status == 200 and reply.json()["id"] == SERVED_NAME
    else:
        assert reply.status == 404, (reply.status, reply.body)
        # Ours names `model`; Starlette's router has its own 404 for a path no route takes
        # (`{model:path}` takes no newline).
        assert reply.json()["error"]["param"] in ("model", None), reply.body
