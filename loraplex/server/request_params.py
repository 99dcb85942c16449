"""From a request body to the engine's SamplingParams: limits, the model's generation defaults,
logit_bias and structured output (response_format, vLLM's guided_* and structured_outputs).

Every field a body accepts takes effect or is refused by name (`schemas.REFUSED_FIELDS`);
other fields are ignored, as OpenAI clients send extras (store, metadata, ...), and logged
once by name.
"""

from __future__ import annotations

import json
import logging

from ..engine.grammar import GrammarSpec
from ..engine.sampling import SEED_MAX, SamplingParams
from .errors import APIError
from .state import ServerState

log = logging.getLogger("loraplex.server")

# what generation_config.json may set, when a request leaves it out (`--generation-config`)
DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_ignored_logged: set[str] = set()  # field names already logged as ignored (once per process)


def sampling_params(state: ServerState, body, prompt_len: int, max_tokens: int | None, default_max: int,
                    logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters for `body`; APIError 400 for what cannot be honoured."""
    c = state.config
    if (bad := body.unsupported()) is not None:
        raise APIError(400, f"{bad} is not supported by this server", param=bad)
    log_ignored(body.ignored_fields())
    if body.n > c.max_n:
        raise APIError(400, f"n must be at most {c.max_n}, got {body.n}", param="n")
    if body.seed is not None and body.seed + body.n - 1 > SEED_MAX:  # choice i is seeded with seed + i
        raise APIError(400, f"seed + n - 1 must be at most 2**64 - 1, got {body.seed} and n = {body.n}",
                       param="seed")
    if body.stream and body.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs are not available with stream", param="prompt_logprobs")
    limit = state.prompt_token_limit
    if prompt_len > limit:
        raise APIError(400, f"the prompt has {prompt_len} tokens; at most {limit} are accepted",
                       param="prompt", code="context_length_exceeded")
    defaults = {k: v for k, v in state.generation_defaults.items() if k not in body.model_fields_set}
    if max_tokens is None:
        default_max = min(default_max, defaults.get("max_tokens", default_max))
        max_tokens = max(1, min(default_max, c.max_tokens_limit, state.max_model_len - prompt_len))
    if max_tokens > c.max_tokens_limit:
        raise APIError(400, f"max_tokens must be at most {c.max_tokens_limit}, got {max_tokens}", param="max_tokens")
    sampled = {k: defaults.get(k, getattr(body, k)) for k in DEFAULTED}
    try:
        return SamplingParams(
            max_tokens=max_tokens, **sampled, seed=body.seed, stop=body.stop or [],
            stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens, min_tokens=body.min_tokens,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=logit_bias(state, body.logit_bias), prompt_logprobs=prompt_logprobs,
            grammar=grammar_spec(body))
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


def log_ignored(names: list[str]) -> None:
    new = [n for n in names if n not in _ignored_logged]
    if new:
        _ignored_logged.update(new)
        log.warning("request fields ignored (neither OpenAI's sampling fields nor vLLM's): %s", ", ".join(new))


def logit_bias(state: ServerState, given: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as JSON keys (strings), each in the vocabulary."""
    bias = {}
    for key, value in (given or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < state.vocab_size:
            raise APIError(400, f"logit_bias token ids must be in [0, {state.vocab_size}), got {token}",
                           param="logit_bias")
        bias[token] = value
    return bias


def grammar_spec(body):
    """The structured-output grammar the body asks for (at most one way), or None."""
    asked = []
    fmt = body.response_format
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            asked.append(("response_format", GrammarSpec.json_object()))
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema, an object",
                               param="response_format")
            asked.append(("response_format", GrammarSpec.json_schema(schema)))
        elif kind not in (None, "text"):
            raise APIError(400, f"response_format type must be text, json_object or json_schema, got {kind!r}",
                           param="response_format")
    so = body.structured_outputs
    given = {
        "guided_json": body.guided_json, "guided_regex": body.guided_regex, "guided_choice": body.guided_choice,
        "guided_grammar": body.guided_grammar,
        "structured_outputs.json": so and so.json_, "structured_outputs.regex": so and so.regex,
        "structured_outputs.choice": so and so.choice, "structured_outputs.grammar": so and so.grammar,
        "structured_outputs.json_object": so and so.json_object,
    }
    for name, value in given.items():
        if value is None or value is False:
            continue
        kind = name.rpartition(".")[2].removeprefix("guided_")
        if kind == "json":
            schema = value
            if isinstance(value, str):
                try:
                    schema = json.loads(value)
                except ValueError:
                    raise APIError(400, f"{name} must be a JSON schema (an object, or its JSON text)",
                                   param=name) from None
            if not isinstance(schema, dict):
                raise APIError(400, f"{name} must be a JSON schema object", param=name)
            asked.append((name, GrammarSpec.json_schema(schema)))
        elif kind == "regex":
            asked.append((name, GrammarSpec.regex(value)))
        elif kind == "choice":
            if not value:
                raise APIError(400, f"{name} must list at least one choice", param=name)
            asked.append((name, GrammarSpec.choice(value)))
        elif kind == "json_object":
            asked.append((name, GrammarSpec.json_object()))
        else:
            asked.append((name, GrammarSpec.grammar(value)))
    if len(asked) > 1:
        raise APIError(400, f"ask for one kind of structured output, got {', '.join(n for n, _ in asked)}",
                       param=asked[1][0])
    spec = asked[0][1] if asked else None
    space = body.guided_whitespace_pattern if so is None or so.whitespace_pattern is None else so.whitespace_pattern
    if space is not None:
        spec = with_whitespace(spec, space)
    return spec


def with_whitespace(spec, pattern: str):
    """A JSON spec whose whitespace between tokens is `pattern` (a regex; "" = compact JSON),
    through llguidance's "x-guidance" schema options."""
    if spec is None or spec.kind not in ("json_object", "json_schema"):
        raise APIError(400, "guided_whitespace_pattern applies to JSON output (guided_json, response_format)",
                       param="guided_whitespace_pattern")
    schema = {"type": "object"} if spec.kind == "json_object" else json.loads(spec.value)
    if not isinstance(schema, dict):
        raise APIError(400, "guided_whitespace_pattern needs a JSON schema object", param="guided_whitespace_pattern")
    return GrammarSpec.json_schema({**schema, "x-guidance": {**schema.get("x-guidance", {}),
                                                             "whitespace_pattern": pattern}})
