"""Adapters loaded on their first request: `--lora-resolve-root DIR` (vLLM's filesystem resolver).

A request whose `model` names no registered adapter may name a directory under a resolve root:
`my-adapter` is ROOT/my-adapter, `org/my-adapter` is ROOT/org/my-adapter (as vLLM's
`lora_filesystem_resolver` with VLLM_LORA_RESOLVER_CACHE_DIR, any depth). That directory is
registered as usual (validated by the registry, every file read confined to the resolve roots)
and the request proceeds with it; later requests find it registered.

Names are checked as text first: no absolute names, no '.' or '..' or empty components, only the
characters of an adapter name (which excludes NUL and backslashes). After links are followed the
directory must still lie inside the root it was found under, and its adapter files inside a
resolve root. Anything else is "no such model" (False), never a look outside the roots.

Concurrent first requests for one name load it once: the first starts the load (a task of its
own, so a client that hangs up does not cancel it for the others) and every caller waits for
that task's result.

Where vLLM differs: its resolver also requires the adapter config's `base_model_name_or_path` to
equal the served model's name; here the registry checks the adapter against the model's shapes
instead. vLLM answers 400 for a directory that is found but cannot be loaded; here it is a 404
that says why (the model, as named, cannot be served).
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from pathlib import Path

from ..adapters.peft_format import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, AdapterError
from ..adapters.registry import NAME_RE, AdapterExistsError, RegistryBusyError
from ..adapters.safe_files import BadPathError, OutsideRootsError, check_files_inside, resolve_inside
from .errors import APIError

log = logging.getLogger("loraplex.server")

# per server state: name -> the task loading it (while it runs)
_loading: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_roots(state) -> list[Path]:
    """The resolve roots of `state`, links followed (the order of the flags)."""
    return [Path(os.path.realpath(r)) for r in state.config.lora_resolve_roots]


def is_resolvable_name(name: str) -> bool:
    """Whether `name` can name a directory under a root at all (text only, no file system call)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return False
    parts = name.split("/")
    return all(part not in ("", ".", "..") for part in parts)


def find_adapter_dir(name: str, roots: list[Path]) -> Path | None:
    """The real directory `name` names under the first root that has it, or None (also for a
    name or a link that would lead outside its root)."""
    if not is_resolvable_name(name):
        return None
    for root in roots:
        try:
            real = resolve_inside(root / name, [root])
        except (OutsideRootsError, BadPathError):
            continue
        if real != root and real.is_dir():
            return real
    return None


async def load_on_first_request(state, name: str, roots: list[Path] | None = None) -> bool:
    """Register the adapter directory `name` names under a --lora-resolve-root, once, and return
    True; False when no root is configured or none holds such a directory (the caller answers
    404 "model does not exist"). A directory that is not a valid adapter raises APIError 404
    saying why. `roots` (links followed) stand in for the server's resolve roots: an
    integration that registers adapters itself (the Ray Serve replicas' multiplexer)."""
    roots = resolve_roots(state) if roots is None else roots
    if not roots or not is_resolvable_name(name):
        return False
    if state.is_base_model(name):
        return False  # the base model's names are never adapters
    if state.registry.has(name):
        return True
    pending = _loading.setdefault(state, {})
    task = pending.get(name)
    if task is None:
        task = asyncio.ensure_future(_load(state, name, roots))
        pending[name] = task

        def done(t: asyncio.Task, name=name) -> None:
            if pending.get(name) is t:
                del pending[name]
            if not t.cancelled():
                t.exception()  # retrieved here too: every waiter may have gone
        task.add_done_callback(done)
    return await asyncio.shield(task)


async def _load(state, name: str, roots: list[Path]) -> bool:
    real = await asyncio.to_thread(find_adapter_dir, name, roots)
    if real is None:
        return False

    def reason(exc: BaseException) -> str:  # the adapter's name, never the server's paths
        return str(exc).replace(str(real), name)

    def refuse(why: str) -> APIError:
        log.warning("adapter %r under a --lora-resolve-root cannot be loaded: %s", name, why)
        return APIError(404, f"the model '{name}' was found under a --lora-resolve-root but cannot be loaded: {why}",
                        param="model", code="model_not_found")

    try:
        # its files, links followed, inside a resolve root (the registry checks each read again)
        await asyncio.to_thread(check_files_inside, real, (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME), roots)
        await asyncio.to_thread(state.registry.register, name, real, roots=[str(r) for r in roots])
    except AdapterExistsError:  # registered meanwhile (an admin, or a replica of this call)
        return True
    except RegistryBusyError as exc:  # (an AdapterError too)
        raise APIError(503, f"the model '{name}' cannot be loaded now: {reason(exc)}") from None
    except (OutsideRootsError, BadPathError, AdapterError) as exc:
        raise refuse(reason(exc)) from None
    except OSError as exc:
        raise refuse(f"its files cannot be read ({exc.strerror or type(exc).__name__})") from None
    log.info("adapter %r loaded on its first request (under a --lora-resolve-root)", name)
    return True
