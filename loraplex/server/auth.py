"""API and admin keys ('Authorization: Bearer KEY'), compared in constant time, never logged.

Admin routes take the admin key (--admin-key); without one they answer 403, unless
--allow-unauthenticated-admin. vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter are
admin routes too, the admin key staying the stronger guard; only without an admin key do they
follow VLLM_ALLOW_RUNTIME_LORA_UPDATING as vLLM does (`_lora_updating_key`).
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from .errors import APIError


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, keys: list[str]) -> bool:
    # every key is compared (no early exit), each in constant time
    found = False
    for key in keys:
        found |= token is not None and hmac.compare_digest(token.encode(), key.encode())
    return found


def is_admin(request: Request) -> bool:
    config = request.app.state.loraplex.config
    if config.admin_key is None:
        return config.allow_unauthenticated_admin
    return _matches(_bearer(request), [config.admin_key])


async def _api_key(request: Request) -> None:
    config = request.app.state.loraplex.config
    if not config.api_keys:
        return
    token = _bearer(request)
    if not _matches(token, config.api_keys) and not (config.admin_key and _matches(token, [config.admin_key])):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _admin_key(request: Request) -> None:
    config = request.app.state.loraplex.config
    if config.admin_key is None:
        if not config.allow_unauthenticated_admin:
            raise APIError(403, "admin routes are disabled: the server has no --admin-key "
                                "(or start it with --allow-unauthenticated-admin)")
        return
    if not _matches(_bearer(request), [config.admin_key]):
        raise APIError(401, "missing or invalid admin key: send 'Authorization: Bearer <admin key>'",
                       code="invalid_api_key")


async def _lora_updating_key(request: Request) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter. The admin key, when there is
    one, is the only key they take, whatever VLLM_ALLOW_RUNTIME_LORA_UPDATING says. Without an
    admin key they follow the variable as in vLLM: true = an API key (open without API keys),
    false = not served (404), unset = as the other admin routes (403 unless
    --allow-unauthenticated-admin)."""
    config = request.app.state.loraplex.config
    if config.admin_key is not None:
        if not _matches(_bearer(request), [config.admin_key]):
            raise APIError(401, "missing or invalid admin key: send 'Authorization: Bearer <admin key>'",
                           code="invalid_api_key")
        return
    if config.runtime_lora_updating is True:
        return await _api_key(request)
    if config.runtime_lora_updating is False:
        raise APIError(404, "Not Found")  # as vLLM, which registers no such route then
    if not config.allow_unauthenticated_admin:
        raise APIError(403, "admin routes are disabled: the server has no --admin-key (or start it with "
                            "--allow-unauthenticated-admin, or set VLLM_ALLOW_RUNTIME_LORA_UPDATING=true to "
                            "let API keys load and unload adapters as in vLLM)")


async def _metrics_key(request: Request) -> None:
    # off by default, as Prometheus scrapes expect; the admin key opens it too
    config = request.app.state.loraplex.config
    if config.metrics_key is None:
        return
    token = _bearer(request)
    if not _matches(token, [config.metrics_key]) and not (config.admin_key and _matches(token, [config.admin_key])):
        raise APIError(401, "missing or invalid metrics key: send 'Authorization: Bearer <metrics key>'",
                       code="invalid_api_key")


require_api_key = Depends(_api_key)
require_admin = Depends(_admin_key)
require_lora_updating = Depends(_lora_updating_key)
require_metrics_key = Depends(_metrics_key)
