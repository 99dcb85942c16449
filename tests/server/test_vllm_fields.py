"""The request fields vLLM honours, through the real server (the engine in its own process and
on a thread): each takes effect, checked against the engine run with the same SamplingParams
or against transformers, or it is refused by name."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from loraplex.adapters.peft_format import read_peft_adapter
from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.request import Request
from loraplex.engine.sampling import SamplingParams
from loraplex.model.loader import load_model
from loraplex.server import chat_template
from loraplex.server.config import ServerConfig
from tests.factory import hf_on_nf4, make_adapter, make_model
from tests.server.test_server import live_server

PROMPT = [5, 9, 17, 33, 2, 8]


@pytest.fixture(scope="module", params=["process", "thread"])
def server(request, tmp_path_factory):
    """The tiny model's server, with the engine in its own process (every field crosses the
    wire) and then on a thread (the API and the engine share the grammar compiler)."""
    root = tmp_path_factory.mktemp("vllm_fields")
    make_model(root / "base", "llama")
    path = make_adapter(root / "base", root / "adapters" / "all", "all", seed=1)
    config = ServerConfig(model=str(root / "base"), served_model_name="tiny", adapters={"all": str(path)},
                          dtype="fp32", device="cpu", kv_cache_tokens=2048, max_num_seqs=16, max_gpu_adapters=2,
                          max_host_adapters=2, max_tokens_limit=64, max_n=4,
                          engine_process=request.param == "process")
    with live_server(config) as (url, state):
        oracle = load_model(root / "base", dtype=torch.float32, progress=False)
        yield {"url": url, "state": state, "root": root, "path": path, "oracle": oracle}


def post(s, route: str, **body) -> httpx.Response:
    return httpx.post(s["url"] + route, json=body, timeout=120)


def complete(s, **body) -> dict:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body}
    r = post(s, "/v1/completions", **body)
    assert r.status_code == 200, r.text
    return r.json()


def engine_tokens(s, params: SamplingParams, adapter: str | None = None, prompt=PROMPT) -> list[int]:
    """What the engine itself generates with these parameters, on the oracle model."""
    o = s["oracle"]
    adapters = None if adapter is None else StaticAdapters(o.model, {"x": read_peft_adapter(s["path"])}, max_rank=16)
    engine = Engine(o.model, o.tokenizer, adapters, EngineConfig(kv_cache_tokens=256))
    outs = []
    engine.add_request(Request("o", list(prompt), params, None if adapter is None else "x", on_output=outs.append))
    engine.run_until_done()
    return [t for out in outs for t in out.token_ids]


def text_of(s, ids: list[int]) -> str:
    return s["state"].tokenizer.decode(ids)


def test_min_tokens_keeps_stop_ids_and_eos_out_until_reached(server):
    free = engine_tokens(server, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stop_id = free[1]
    short = complete(server, stop_token_ids=[stop_id], ignore_eos=True)["choices"][0]
    assert short["finish_reason"] == "stop" and short["stop_reason"] == stop_id
    assert short["text"] == text_of(server, free[:1])  # a stop token's text is not in the output
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=5)
    want = engine_tokens(server, params)
    assert len(want) >= 5 and stop_id not in want[:5]
    out = complete(server, stop_token_ids=[stop_id], ignore_eos=True, min_tokens=5)["choices"][0]
    assert out["text"] == text_of(server, [t for t in want if t != stop_id])


def test_stop_reason_and_include_stop_str_in_output(server):
    text = text_of(server, engine_tokens(server, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    stop = text[3:5]
    out = complete(server, stop=[stop], ignore_eos=True)["choices"][0]
    assert out["text"] == text[:text.find(stop)] and out["stop_reason"] == stop
    kept = complete(server, stop=[stop], ignore_eos=True, include_stop_str_in_output=True)["choices"][0]
    assert kept["text"] == text[:text.find(stop) + len(stop)] and kept["stop_reason"] == stop
    events = streamed(server, stop=[stop], ignore_eos=True)
    assert events[-1]["choices"][0]["stop_reason"] == stop
    assert complete(server, ignore_eos=True)["choices"][0]["stop_reason"] is None  # length


def streamed(s, route="/v1/completions", **body) -> list[dict]:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", s["url"] + route, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_penalties_and_bias_take_effect_as_in_the_engine(server):
    for fields in ({"repetition_penalty": 1.8}, {"frequency_penalty": 1.5}, {"presence_penalty": -2.0},
                   {"min_p": 0.3, "temperature": 1.0, "seed": 3}, {"logit_bias": {"7": 5.0, "11": -100}}):
        params = SamplingParams(max_tokens=8, ignore_eos=True, **{"temperature": 0, **fields,
                                **({"logit_bias": {7: 5.0, 11: -100.0}} if "logit_bias" in fields else {})})
        want = engine_tokens(server, params, adapter="all")
        out = complete(server, model="all", ignore_eos=True, **fields)["choices"][0]
        assert out["text"] == text_of(server, want), fields
    forced = complete(server, logit_bias={"42": 100}, ignore_eos=True)["choices"][0]
    assert forced["text"] == text_of(server, [42] * 8)


def test_skip_special_tokens(server):
    eos = server["state"].tokenizer.eos_token_id
    body = {"logit_bias": {str(eos): 100}, "ignore_eos": True, "max_tokens": 2}
    assert complete(server, **body)["choices"][0]["text"] == ""
    assert complete(server, **body, skip_special_tokens=False)["choices"][0]["text"] == "</s></s>"


def test_fields_we_cannot_honour_are_refused_by_name(server):
    for field, value in (("use_beam_search", True), ("allowed_token_ids", [1, 2]), ("guided_decoding_backend", "xgrammar"),
                         ("truncate_prompt_tokens", 3), ("priority", 1), ("logits_processors", ["x"])):
        r = post(server, "/v1/completions", model="tiny", prompt=PROMPT, max_tokens=2, **{field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    # their neutral values, and fields no API defines, are fine
    complete(server, use_beam_search=False, priority=0, some_client_extra={"x": 1})
    for bad in ({"logit_bias": {"x": 1}}, {"logit_bias": {"100000": 1}}, {"logit_bias": {"3": 101}},
                {"min_tokens": 9}, {"repetition_penalty": 0}, {"presence_penalty": 3}, {"min_p": 1.5}):
        r = post(server, "/v1/completions", model="tiny", prompt=PROMPT, max_tokens=8, **bad)
        assert r.status_code == 400, (bad, r.text)


def hf_logprobs(s, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits for `ids` on the base model with the served NF4
    weights (dequantized): [len, V]."""
    model = hf_on_nf4(s["root"] / "base", s["oracle"].model)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_with_logprobs_scores_the_prompt_as_transformers(server):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 1."""
    out = complete(server, echo=True, logprobs=2, max_tokens=1)["choices"][0]
    lp = out["logprobs"]
    assert out["text"].startswith(text_of(server, PROMPT)) and len(lp["tokens"]) == len(PROMPT) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = hf_logprobs(server, PROMPT)
    for i in range(1, len(PROMPT)):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, PROMPT[i]].item(), abs=1e-4)
        top = lp["top_logprobs"][i]  # keyed by text: two tokens of one text (a partial byte) are one entry
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
    assert lp["text_offset"][0] == 0
    # streamed: the prompt first, then the tokens
    events = streamed(server, echo=True, max_tokens=2)
    assert events[0]["choices"][0]["text"] == text_of(server, PROMPT)


def test_prompt_logprobs_in_vllms_format(server):
    out = complete(server, prompt_logprobs=1, max_tokens=1)["choices"][0]["prompt_logprobs"]
    ref = hf_logprobs(server, PROMPT)
    assert out[0] is None and len(out) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        entry = out[i][str(PROMPT[i])]
        assert entry["logprob"] == pytest.approx(ref[i - 1, PROMPT[i]].item(), abs=1e-4)
        assert entry["rank"] == int((ref[i - 1] > ref[i - 1, PROMPT[i]]).sum()) + 1
        top = int(ref[i - 1].argmax())
        assert out[i][str(top)]["rank"] == 1
    chat = post(server, "/v1/chat/completions", model="tiny", messages=[{"role": "user", "content": "hi"}],
                max_tokens=1, prompt_logprobs=0).json()
    assert chat["prompt_logprobs"][0] is None
    r = post(server, "/v1/completions", model="tiny", prompt=PROMPT, prompt_logprobs=1, stream=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_tokenize_detokenize_and_models_max_model_len(server):
    tok = server["state"].tokenizer
    r = post(server, "/tokenize", prompt="hello world").json()
    assert r["tokens"] == tok.encode("hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server["state"].max_model_len
    bare = post(server, "/tokenize", prompt="hello world", add_special_tokens=False, return_token_strs=True).json()
    assert bare["tokens"] == tok.encode("hello world", add_special_tokens=False)
    assert bare["token_strs"] == tok.convert_ids_to_tokens(bare["tokens"])
    messages = [{"role": "user", "content": "hi"}]
    chat = post(server, "/tokenize", model="all", messages=messages).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                                        add_special_tokens=False)
    assert post(server, "/detokenize", tokens=r["tokens"]).json()["prompt"] == tok.decode(r["tokens"])
    assert post(server, "/detokenize", tokens=[10**7]).status_code == 400
    assert post(server, "/tokenize", model="nope", prompt="x").status_code == 404
    models = httpx.get(server["url"] + "/v1/models").json()["data"]
    assert {m["max_model_len"] for m in models} == {server["state"].max_model_len}
    config = server["state"].config
    config.served_model_aliases = ["org/tiny"]
    try:  # every served name is listed, and answers as the base model
        models = httpx.get(server["url"] + "/v1/models").json()["data"]
        assert [m["id"] for m in models if m["parent"] is None] == ["tiny", "org/tiny"]
        assert complete(server, model="org/tiny")["choices"][0]["text"] == complete(server)["choices"][0]["text"]
    finally:
        config.served_model_aliases = []


def test_n_greedy_gives_n_identical_choices(server):
    choices = complete(server, n=3, ignore_eos=True)["choices"]
    assert len(choices) == 3 and len({c["text"] for c in choices}) == 1


STRING_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
PARTS_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
                  "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}\n{% endfor %}")


def test_content_parts_render_as_transformers_renders_them(server):
    """A template that reads parts gets the list, exactly as transformers' apply_chat_template;
    one that prints content gets the parts joined by newlines, as vLLM gives it."""
    from loraplex.server.schemas import ChatMessage

    tok = server["state"].tokenizer
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    raw = [{"role": "user", "content": parts}]
    messages = [ChatMessage(**m) for m in raw]
    assert chat_template.reads_content_parts(PARTS_TEMPLATE) and not chat_template.reads_content_parts(STRING_TEMPLATE)
    saved = tok.chat_template
    try:
        tok.chat_template = PARTS_TEMPLATE
        assert chat_template.render(tok, messages) == tok.apply_chat_template(raw, tokenize=False,
                                                                                add_generation_prompt=True)
        tok.chat_template = STRING_TEMPLATE
        joined = [{"role": "user", "content": "hello\nworld"}]
        assert chat_template.render(tok, messages) == tok.apply_chat_template(joined, tokenize=False,
                                                                                add_generation_prompt=True)
    finally:
        tok.chat_template = saved


def test_chat_template_options(server):
    tok = server["state"].tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    r = post(server, "/tokenize", messages=messages, add_generation_prompt=False, continue_final_message=True).json()
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert r["tokens"] == tok.encode(text, add_special_tokens=False)
    r = post(server, "/tokenize", messages=messages, continue_final_message=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


# -- structured output ----------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["kind", "ok", "n"], "additionalProperties": False}


def matches_schema(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"kind", "ok", "n"} and value["kind"] in ("cat", "dog")
            and isinstance(value["ok"], bool) and type(value["n"]) is int and 0 <= value["n"] <= 99)


def test_structured_output_every_way_of_asking(server):
    """A random model: whatever it prefers, the output parses and matches (a finite grammar
    ends with finish reason stop; whitespace tokens are biased away, or a random model spends
    its tokens on the whitespace JSON allows between tokens)."""
    import re

    tok = server["state"].tokenizer
    no_space = {str(i): -100 for i in range(len(tok)) if not tok.decode([i]).strip() and i not in tok.all_special_ids}

    chat = [{"role": "user", "content": "pets"}]
    cases = [
        ("/v1/chat/completions", {"messages": chat, "response_format": {"type": "json_schema", "json_schema":
                                                                        {"name": "pet", "schema": SCHEMA}}}, "schema"),
        ("/v1/completions", {"guided_json": SCHEMA}, "schema"),
        ("/v1/completions", {"guided_json": json.dumps(SCHEMA), "model": "all"}, "schema"),
        ("/v1/completions", {"structured_outputs": {"json": SCHEMA}, "temperature": 1.0, "seed": 5}, "schema"),
        ("/v1/completions", {"guided_json": SCHEMA, "guided_whitespace_pattern": "", "logit_bias": {}}, "compact"),
        ("/v1/completions", {"guided_regex": r"\d{3}-[a-z]{2}"}, "regex"),
        ("/v1/completions", {"structured_outputs": {"regex": r"(yes|no)!"}, "model": "all"}, "regex2"),
        ("/v1/completions", {"guided_choice": ["alpha", "beta", "gamma delta"]}, "choice"),
        ("/v1/chat/completions", {"messages": chat, "structured_outputs": {"choice": ["x", "yy"]}}, "choice2"),
        ("/v1/completions", {"guided_grammar": 'start: "a" ("b" | "c")+ "."', "max_tokens": 64}, "grammar"),
    ]
    for route, body, kind in cases:
        body = {"model": "tiny", "max_tokens": 48, "temperature": 0, "logit_bias": no_space,
                **({"prompt": PROMPT} if "messages" not in body else {}), **body}
        r = post(server, route, **body)
        assert r.status_code == 200, (body, r.text)
        choice = r.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert choice["finish_reason"] == "stop", (body, text)
        if kind == "schema":
            assert matches_schema(json.loads(text)), text
        elif kind == "compact":
            assert matches_schema(json.loads(text)) and " " not in text and "\n" not in text, text
        elif kind == "regex":
            assert re.fullmatch(r"\d{3}-[a-z]{2}", text), text
        elif kind == "regex2":
            assert text in ("yes!", "no!"), text
        elif kind == "choice":
            assert text in ("alpha", "beta", "gamma delta"), text
        elif kind == "choice2":
            assert text in ("x", "yy"), text
        else:
            assert re.fullmatch(r"a[bc]+\.", text), text
    streamed_text = "".join(e["choices"][0]["text"] for e in streamed(server, guided_choice=["alpha", "beta"])
                            if e["choices"])
    assert streamed_text in ("alpha", "beta")
    obj = post(server, "/v1/completions", model="tiny", prompt=PROMPT, max_tokens=48, logit_bias=no_space,
               response_format={"type": "json_object"}).json()["choices"][0]
    if obj["finish_reason"] == "stop":  # a random model's object may not close within max_tokens
        assert isinstance(json.loads(obj["text"]), dict)
    else:
        assert obj["text"].lstrip().startswith("{")


def test_structured_output_rows_share_a_batch_with_free_rows(server):
    """Grammar rows and free rows on the base model and an adapter, concurrently: the free rows
    give the engine's own greedy outputs."""
    import asyncio

    async def main():
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as c:
            bodies = [{"model": m, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                       **({"guided_choice": ["alpha", "beta"]} if g else {})}
                      for m in ("tiny", "all") for g in (False, True)] * 2
            answers = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
            return bodies, [a.json()["choices"][0]["text"] for a in answers]

    bodies, texts = asyncio.run(main())
    for body, text in zip(bodies, texts):
        if "guided_choice" in body:
            assert text in ("alpha", "beta")
        else:
            adapter = None if body["model"] == "tiny" else "all"
            want = engine_tokens(server, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), adapter)
            assert text == text_of(server, want)


def test_structured_output_errors(server):
    for body in ({"guided_regex": "(unclosed"}, {"guided_json": {"type": "nonsense"}}, {"guided_json": "{not json"},
                 {"guided_choice": []}, {"guided_regex": "a", "guided_choice": ["a"]},
                 {"response_format": {"type": "json_schema"}}, {"response_format": {"type": "yaml"}},
                 {"guided_regex": "a+", "guided_whitespace_pattern": ""}):
        r = post(server, "/v1/completions", model="tiny", prompt=PROMPT, max_tokens=4, **body)
        assert r.status_code == 400, (body, r.text)
        assert "Traceback" not in r.text and "/" not in r.json()["error"]["message"].replace("//", ""), r.text


def test_generation_config_defaults_apply_to_fields_a_request_leaves_out(server):
    """--generation-config auto: the model's generation_config.json values (loaded into
    state.generation_defaults, tests/server/test_vllm_cli.py) are defaults, not overrides."""
    state = server["state"]
    greedy = text_of(server, engine_tokens(server, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    saved = state.generation_defaults
    state.generation_defaults = {"temperature": 1.0, "top_k": 1, "max_tokens": 3}
    try:
        body = {"model": "tiny", "prompt": PROMPT, "ignore_eos": True, "seed": 1}
        out = post(server, "/v1/completions", **body).json()["choices"][0]
        assert out["text"] == text_of(server, engine_tokens(server, SamplingParams(max_tokens=3, temperature=0,
                                                                                   ignore_eos=True)))
        assert post(server, "/v1/completions", **body, max_tokens=8).json()["choices"][0]["text"] == greedy
        # set by the request: its own values win (top_k off, temperature 2: not the greedy text)
        free = [post(server, "/v1/completions", **{**body, "seed": s}, max_tokens=8, top_k=0, temperature=2.0)
                .json()["choices"][0]["text"] for s in range(3)]
        assert any(text != greedy for text in free)
    finally:
        state.generation_defaults = saved
