"""Chat messages rendered through the model's chat template, as transformers renders them.

Content given as parts (`[{"type": "text", "text": ...}]`) reaches the template as it does in
transformers' `apply_chat_template` when the template reads parts (it loops over a message's
content): the list, unchanged. A template that only prints `message['content']` would print
the list's Python repr in transformers; for those the text parts are joined with a newline
first, as vLLM does ("string" content format), so the template gets the string it expects.
"""

from __future__ import annotations

import functools
import logging

from .errors import APIError

log = logging.getLogger("loraplex.server")


@functools.lru_cache(maxsize=8)
def reads_content_parts(template: str) -> bool:
    """Whether the Jinja template loops over a message's content (OpenAI's list-of-parts form)."""
    import jinja2
    from jinja2 import nodes

    try:
        tree = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False

    def is_content(node) -> bool:
        return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"
                ) or (isinstance(node, nodes.Getattr) and node.attr == "content")

    return any(is_content(loop.iter) or any(is_content(n) for n in loop.iter.find_all((nodes.Getitem, nodes.Getattr)))
               for loop in tree.find_all(nodes.For))


def messages_for_template(template: str, messages: list) -> list[dict]:
    """The request's messages as the template takes them (see the module docstring)."""
    parts = reads_content_parts(template)
    out = []
    for m in messages:
        message = m.model_dump(exclude_none=True, include={"role", "content", "name"})
        if isinstance(m.content, list) and not parts:
            message["content"] = "\n".join(p.text for p in m.content)
        out.append(message)
    return out


def render(tokenizer, messages: list, *, add_generation_prompt: bool = True, continue_final_message: bool = False,
           template_kwargs: dict | None = None) -> str:
    """The conversation as text, through the tokenizer's chat template; 400 when the template
    refuses it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    if not isinstance(template, str):  # several named templates: transformers picks "default"
        template = template.get("default") or next(iter(template.values()))
    if add_generation_prompt and continue_final_message:
        raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true",
                       param="continue_final_message")
    kwargs = dict(template_kwargs or {})
    for reserved in ("messages", "add_generation_prompt", "continue_final_message", "tokenize", "chat_template"):
        if reserved in kwargs:
            raise APIError(400, f"chat_template_kwargs cannot set {reserved}", param="chat_template_kwargs")
    try:
        return tokenizer.apply_chat_template(messages_for_template(template, messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as exc:
        from jinja2 import TemplateError  # there: transformers renders templates with it

        if isinstance(exc, TemplateError):  # the template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from None
        if isinstance(exc, ValueError) and continue_final_message:  # transformers: the last message is not one
            raise APIError(400, f"continue_final_message: {exc}", param="continue_final_message") from None
        log.exception("the chat template failed")  # a fault of the template or tokenizer: not for the client
        raise APIError(400, "the chat template cannot render these messages; see the server log",
                       param="messages") from None
