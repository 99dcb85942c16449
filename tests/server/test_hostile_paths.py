"""Adapter paths and files from a hostile admin client, over HTTP: malformed paths, links out of
the adapter roots, config bombs and backtracking regexes are clear 4xx answers in OpenAI's
error body (never a 500), quick, and show no file's contents."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from loraplex.server.config import ServerConfig
from tests.factory import make_adapter, make_model
from tests.server.test_server import ADMIN_KEY, live_server

SECRET = "do-not-show-this-value"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The tiny model's server (engine on a thread) with one adapter root, and an adapter outside it."""
    base = tmp_path_factory.mktemp("hostile")
    make_model(base / "base", "llama")
    root = base / "adapters"
    good = make_adapter(base / "base", root / "attn", "attn")
    outside = make_adapter(base / "base", base / "outside", "attn")
    config = ServerConfig(model=str(base / "base"), served_model_name="tiny", dtype="fp32", device="cpu",
                          kv_cache_tokens=256, max_num_seqs=4, max_gpu_adapters=2, max_host_adapters=4,
                          adapter_roots=[str(root)], admin_key=ADMIN_KEY, engine_process=False)
    with live_server(config) as (url, _):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        yield {"client": client, "root": root, "good": good, "outside": outside, "base": base}


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _register(s, name: str, path) -> httpx.Response:
    return s["client"].post("/admin/adapters", json={"name": name, "path": str(path)})


def _variant(s, name: str, **config_changes):
    """A copy of the good adapter inside the root, with `config_changes` applied to its config."""
    path = s["root"] / name
    shutil.copytree(s["good"], path)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(config_changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("bad", ["attn\x00x", "x" * 5000], ids=["nul", "long-name"])
def test_malformed_paths_are_400_on_every_route(hostile, bad):
    path = str(hostile["root"] / bad)
    calls = [
        ("/admin/adapters", {"name": "bad", "path": path}),
        ("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path}),
        ("/admin/adapters/attn/export", {"path": path}),
    ]
    assert _register(hostile, "attn", hostile["good"]).status_code in (201, 409)
    for route, body in calls:
        error = _error(hostile["client"].post(route, json=body), 400)
        assert error["param"] == "path" and error["type"] == "invalid_request_error"
        assert "NUL byte" in error["message"] or "longer than 255 bytes" in error["message"]


def test_files_linked_out_of_the_roots_are_403(hostile):
    linked = hostile["root"] / "linked"
    linked.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (linked / name).symlink_to(hostile["outside"] / name)
    error = _error(_register(hostile, "linked", linked), 403)
    assert "is a link to a file outside the allowed adapter roots" in error["message"]
    assert _error(hostile["client"].get("/admin/adapters/linked"), 404)


def test_a_linked_config_shows_nothing_of_the_file(hostile):
    secret = hostile["base"] / "secret.json"
    secret.write_text(json.dumps({"peft_type": SECRET}))
    path = _variant(hostile, "leaky")
    (path / "adapter_config.json").unlink()
    (path / "adapter_config.json").symlink_to(secret)
    response = _register(hostile, "leaky", path)
    _error(response, 403)
    assert SECRET not in response.text
    # the same wrong value in a file inside the root: described, not shown
    response = _register(hostile, "leaky2", _variant(hostile, "leaky2", peft_type=SECRET))
    assert "peft_type" in _error(response, 400)["message"] and SECRET not in response.text


def test_config_bombs_are_400(hostile):
    deep = _variant(hostile, "deep")
    text = (deep / "adapter_config.json").read_text()
    (deep / "adapter_config.json").write_text(text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "nests deeper" in _error(_register(hostile, "deep", deep), 400)["message"]
    huge = _variant(hostile, "huge", lora_alpha=1e308)
    assert "scaling" in _error(_register(hostile, "huge", huge), 400)["message"]


def test_backtracking_regex_neither_freezes_nor_500s(hostile):
    # matches exactly the saved q/v_proj paths; Python's re needs seconds per k/o_proj path
    path = _variant(hostile, "regex", target_modules="(?:.|.){25}[qv]_proj")
    started = time.monotonic()
    assert _register(hostile, "regex", path).status_code == 201
    assert time.monotonic() - started < 3
    refused = _variant(hostile, "backref", target_modules=r"(.)\1*_proj")
    assert "backreferences" in _error(_register(hostile, "backref", refused), 400)["message"]
