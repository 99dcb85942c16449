"""Admin routes (/admin/adapters...) and vLLM's /v1/load_lora_adapter, /v1/unload_lora_adapter.

/admin/* take the admin key; vLLM's two routes take it too when there is one, and otherwise
follow VLLM_ALLOW_RUNTIME_LORA_UPDATING as vLLM does (auth.py).

File work (reading, validating, merging, exporting) runs in a worker thread, so the event
loop keeps streaming meanwhile; the registry itself is thread-safe. Paths must resolve, after
symlinks, inside an allowed adapter root.
"""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ..adapters.peft_format import AdapterError
from ..adapters.registry import AdapterExistsError, RegistryBusyError
from ..adapters.safe_files import BadPathError
from ..engine.adapters import UnknownAdapterError
from .auth import require_admin, require_lora_updating
from .errors import APIError, documented_errors
from .schemas import ExportAdapter, LoadLoraAdapter, MergeAdapters, PinAdapter, RegisterAdapter, UnloadLoraAdapter
from .state import AdapterPathError, ServerState

_ERRORS = documented_errors(400, 401, 403, 404, 409, 413, 500, 503)
admin = APIRouter(dependencies=[require_admin], responses=_ERRORS)             # /admin/*: the admin key
vllm = APIRouter(dependencies=[require_lora_updating], responses=_ERRORS)      # vLLM's two (see auth.py)
router = APIRouter()  # both, as the app includes them (filled at the end of this module)


def _state(request: Request) -> ServerState:
    state = request.app.state.loraplex
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading")
    return state


def _info(info) -> dict:
    return {"object": "adapter", **dataclasses.asdict(info)}


async def _call(fn, *args, **kwargs):
    """Run a registry call off the event loop; its errors become API errors."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except UnknownAdapterError as exc:
        raise APIError(404, str(exc), param="name", code="adapter_not_found") from None
    except AdapterExistsError as exc:
        raise APIError(409, str(exc), param="name", code="adapter_exists") from None
    except RegistryBusyError as exc:
        raise APIError(409, str(exc)) from None
    except AdapterPathError as exc:  # not any PermissionError: the OS's name server paths (500, logged)
        raise APIError(403, str(exc), param="path") from None
    except BadPathError as exc:  # a NUL byte, an over-long name: says which, echoes nothing
        raise APIError(400, str(exc), param="path") from None
    except AdapterError as exc:
        raise APIError(400, str(exc)) from None


def _check_name(state: ServerState, name: str) -> None:
    if state.is_base_model(name):
        raise APIError(409, f"'{name}' is the base model's name", param="name", code="adapter_exists")


async def register(state: ServerState, name: str, path: str, replace: bool = False, pin: bool = False):
    _check_name(state, name)
    real = await _call(state.resolve_adapter_path, path)
    return await _call(state.registry.register, name, real, replace=replace, pin=pin,
                       roots=[str(r) for r in state.adapter_roots])


async def unload(state: ServerState, name: str, force: bool):
    info = await _call(state.registry.unload, name, force=force)
    state.metrics.forget_adapter(name)
    return info


@admin.post("/admin/adapters", status_code=201)
async def register_adapter(body: RegisterAdapter, request: Request):
    return _info(await register(_state(request), body.name, body.path, body.replace, body.pin))


@admin.get("/admin/adapters")
async def list_adapters(request: Request):
    state = _state(request)
    infos, usage = await _call(state.registry.list), await _call(state.registry.usage)
    return {"object": "list", "data": [_info(i) for i in infos], "usage": usage}


@admin.post("/admin/adapters/merge", status_code=201)
async def merge_adapters(body: MergeAdapters, request: Request):
    state = _state(request)
    _check_name(state, body.name)
    options = {k: v for k, v in dict(rank=body.rank, density=body.density).items() if v is not None}
    if body.method in ("ties", "dare_ties"):
        options["majority_sign_method"] = body.majority_sign_method
    if body.method.startswith("dare"):
        options["seed"] = body.seed
    info = await _call(state.registry.merge, body.name, body.method, [(s.name, s.weight) for s in body.sources],
                       replace=body.replace, pin=body.pin, **options)
    return _info(info)


@admin.get("/admin/adapters/{name:path}")
async def show_adapter(name: str, request: Request):
    return _info(await _call(_state(request).registry.info, name))


@admin.delete("/admin/adapters/{name:path}")
async def delete_adapter(name: str, request: Request, force: bool = False):
    """Drain (new requests 404 at once, running ones finish) or, with ?force=true, abort its requests."""
    return _info(await unload(_state(request), name, force))


@admin.post("/admin/adapters/{name:path}/export")
async def export_adapter(name: str, body: ExportAdapter, request: Request):
    state = _state(request)
    dest = await _call(state.resolve_adapter_path, body.path)
    path = await _call(state.registry.export, name, dest)
    return {"object": "adapter.export", "name": name, "path": str(path)}


@admin.post("/admin/adapters/{name:path}/pin")
async def pin_adapter(name: str, body: PinAdapter, request: Request):
    return _info(await _call(_state(request).registry.pin, name, body.pinned))


# vLLM-compatible routes (plain-text success bodies, as vLLM answers)

@vllm.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapter, request: Request):
    """vLLM's: a name already loaded is a 400, unless `load_inplace`, which swaps its weights for
    new requests at once (running ones finish on the old), or loads it when it is new."""
    state = _state(request)
    _check_name(state, body.lora_name)  # the base model's names: 409, as on /admin/adapters
    try:
        await register(state, body.lora_name, body.lora_path, replace=body.load_inplace)
    except APIError as exc:
        if exc.code == "adapter_exists":  # as vLLM answers
            raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded. If you want to load "
                                f"the adapter in place, set 'load_inplace' to True.", param="lora_name") from None
        raise
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@vllm.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapter, request: Request):
    await unload(_state(request), body.lora_name, force=False)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


router.include_router(admin)
router.include_router(vllm)
