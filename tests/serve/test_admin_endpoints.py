"""The RL trainer's admin routes (glm5/serve/admin.py): sleep / wake_up / is_sleeping / reset_prefix_cache and
update_weights_from_disk, over loopback HTTP against the real engine on tiny checkpoints made here."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from glm5.config import GLM5Config
from glm5.model.transformer import GLM5ForCausalLM

from .conftest import API_KEY, MODEL_NAME, ServerThread

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ROUTES = [("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"), ("POST", "/reset_prefix_cache"),
          ("POST", "/update_weights_from_disk")]


# ---------------------------------------------------------------------------------------------- fixtures
def _weights_dir(path, like, seed: int, **config_changes):
    """A checkpoint of ``like``'s architecture (changed by ``config_changes``) with other random weights, and
    ``like``'s tokenizer so that a server can start on it."""
    cfg = GLM5Config.from_pretrained(like)
    GLM5ForCausalLM(cfg.replace(**config_changes) if config_changes else cfg).init_weights(seed=seed).save_pretrained(path)
    for f in like.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def ckpts(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("admin_ckpts")
    d = {"a": model_dir, "b": _weights_dir(root / "b", model_dir, seed=1)}
    cfg = GLM5Config.from_pretrained(model_dir)
    d["wide"] = _weights_dir(root / "wide", model_dir, seed=2, hidden_size=cfg.hidden_size * 2)
    d["rope"] = _weights_dir(root / "rope", model_dir, seed=3,  # same shapes, another model
                             rope_parameters={**cfg.rope_parameters, "rope_theta": 12345.0})
    d["no_mtp"] = _weights_dir(root / "no_mtp", model_dir, seed=5, num_nextn_predict_layers=0)  # tensors missing
    d["lying"] = _weights_dir(root / "lying", model_dir, seed=4, hidden_size=cfg.hidden_size * 2)
    shutil.copy(model_dir / "config.json", d["lying"] / "config.json")  # the config says A; the tensors are wider
    d["truncated"] = shutil.copytree(d["b"], root / "truncated")
    shard = d["truncated"] / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (root / "empty").mkdir()
    d["empty"] = root / "empty"
    return d


def _app(path, **options):
    from glm5.serve.admin import AdminOptions
    from glm5.serve.app import create_app
    from glm5.serve.backend import EngineBackend
    from glm5.serve.settings import ServeSettings

    backend = EngineBackend.from_pretrained(str(path), max_model_len=512, max_num_seqs=8, seed=0)
    return create_app(backend, ServeSettings(served_model_names=[MODEL_NAME], api_key=API_KEY), AdminOptions(**options))


@pytest.fixture(scope="module")
def srv(ckpts):
    """Both admin flags on, serving checkpoint A."""
    app = _app(ckpts["a"], sleep_mode=True, weight_updates=True)
    with ServerThread(app) as s:
        s.control = app.state.admin
        s.http = httpx.Client(base_url=s.url, headers=AUTH, timeout=60)
        yield s
        s.http.close()


@pytest.fixture(scope="module")
def ref_b(ckpts):
    """A plain server (no admin flags) started on checkpoint B."""
    app = _app(ckpts["b"])
    with ServerThread(app) as s:
        s.app = app
        s.http = httpx.Client(base_url=s.url, headers=AUTH, timeout=60)
        yield s
        s.http.close()


@pytest.fixture(autouse=True)
def back_to_a(request, ckpts):
    """Every test leaves the admin server awake on A, even when it fails halfway."""
    yield
    if "srv" not in request.fixturenames:
        return
    srv = request.getfixturevalue("srv")
    srv.http.post("/wake_up")
    if srv.control.needs_weights or getattr(srv, "on", "a") != "a":
        assert _update(srv, ckpts["a"], abort_all_requests=True).status_code == 200
        srv.on = "a"


# ----------------------------------------------------------------------------------------------- helpers
def _complete(s, prompt="The king of the hill", max_tokens=12):
    r = s.http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _chat(s, stream=False):
    return s.http.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 4, "stream": stream,
                                                     "messages": [{"role": "user", "content": "hi"}]})


def _update(s, path, **body):
    return s.http.post("/update_weights_from_disk", json={"model_path": str(path), **body})


def _error_code(r) -> str:
    return r.json()["error"]["code"]


def _slow_steps(monkeypatch, srv, seconds=0.01):
    """Each engine step takes at least ``seconds``, so a long request is reliably still running when the test acts."""
    engine = srv.control.engine
    step = engine.step

    def slow(*a, **k):
        time.sleep(seconds)
        return step(*a, **k)

    monkeypatch.setattr(engine, "step", slow)


def _open_stream(srv, max_tokens):
    """Start a streaming completion; returns (response, line iterator) once its first token has arrived."""
    client = httpx.Client(base_url=srv.url, headers=AUTH, timeout=60)
    req = client.build_request("POST", "/v1/completions", json={
        "model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True})
    resp = client.send(req, stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
            return client, resp, lines
    raise AssertionError("the stream ended before its first token")


def _finish(lines) -> tuple[str | None, str]:
    """Read a stream to its end: (last finish_reason, all text)."""
    reason, text = None, ""
    for line in lines:
        if line.startswith("data: {"):
            c = json.loads(line[6:])["choices"]
            if c:
                text += c[0]["text"]
                reason = c[0]["finish_reason"] or reason
    return reason, text


def _metric(srv, line_start: str) -> float:
    body = srv.http.get("/metrics").text
    return float(next((ln.split()[-1] for ln in body.splitlines() if ln.startswith(line_start)), "0"))


# ------------------------------------------------------------------------------------------------- tests
def test_routes_are_absent_without_their_flag(ref_b):
    for method, path in ROUTES:
        assert ref_b.http.request(method, path, json={}).status_code == 404, path
    from glm5.serve.admin import AdminOptions
    from glm5.serve.app import create_app

    def paths(**options):
        app = create_app(ref_b.app.state.serve.backend, ref_b.app.state.serve.settings, AdminOptions(**options))
        return {getattr(r, "path", "") for r in app.routes}

    assert "/sleep" in paths(sleep_mode=True) and "/update_weights_from_disk" not in paths(sleep_mode=True)
    assert "/update_weights_from_disk" in paths(weight_updates=True) and "/sleep" not in paths(weight_updates=True)
    assert ref_b.http.get("/health").json() == {"status": "ok", "model": MODEL_NAME}  # unchanged without flags


def test_admin_routes_need_the_key(srv):
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, srv.url + path, json={"model_path": "/"}, headers=headers, timeout=30)
            assert r.status_code == 401, (path, r.text)
    assert srv.http.get("/is_sleeping").json() == {"is_sleeping": False}  # none of them acted


def test_sleep_refuses_generation_then_wakes_to_the_same_completion(srv):
    before = _complete(srv)
    sleeps = _metric(srv, 'glm5_sleep_total{level="1"}')
    assert srv.http.post("/sleep", params={"level": 1}).json()["is_sleeping"] is True
    assert srv.http.get("/is_sleeping").json() == {"is_sleeping": True}
    health = srv.http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "sleeping" and health.json()["is_sleeping"]
    for r in (_chat(srv), _chat(srv, stream=True),
              srv.http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}),
              srv.http.post("/v1/responses", json={"model": MODEL_NAME, "input": "hi", "max_output_tokens": 2})):
        assert r.status_code == 503 and _error_code(r) == "engine_sleeping", r.text
        assert "/wake_up" in r.json()["error"]["message"]
    assert _metric(srv, "glm5_is_sleeping ") == 1 and _metric(srv, 'glm5_sleep_total{level="1"}') == sleeps + 1
    # the cache alone: still asleep; then the weights
    assert srv.http.post("/wake_up", params={"tags": "kv_cache"}).json() == {"is_sleeping": True}
    assert _chat(srv).status_code == 503
    assert srv.http.post("/wake_up", params={"tags": "weights"}).json() == {"is_sleeping": False}
    assert srv.http.get("/health").json() == {"status": "ok", "model": MODEL_NAME, "is_sleeping": False}
    assert _complete(srv) == before
    assert srv.http.post("/reset_prefix_cache").json() == {"success": True}
    assert _complete(srv) == before


def test_bad_levels_and_tags_are_400(srv):
    for level in ("0", "3", "two"):
        r = srv.http.post("/sleep", params={"level": level})
        assert r.status_code == 400 and r.json()["error"]["param"] == "level", r.text
    assert srv.http.post("/sleep").status_code == 200  # level 1 by default
    r = srv.http.post("/wake_up", params={"tags": ["weights", "optimizer"]})
    assert r.status_code == 400 and "optimizer" in r.json()["error"]["message"]
    assert srv.http.get("/is_sleeping").json() == {"is_sleeping": True}  # nothing half-woken


def test_sleep_with_a_request_in_flight_is_409_and_the_request_completes(srv, monkeypatch):
    _slow_steps(monkeypatch, srv)
    client, resp, lines = _open_stream(srv, max_tokens=40)
    try:
        r = srv.http.post("/sleep", params={"level": 1})
        assert r.status_code == 409 and _error_code(r) == "requests_in_flight", r.text
        assert "in flight" in r.json()["error"]["message"]
        assert _finish(lines)[0] == "length"
    finally:
        resp.close()
        client.close()
    assert srv.http.get("/is_sleeping").json() == {"is_sleeping": False}


def test_level2_wake_weights_update_equals_a_server_started_on_the_new_checkpoint(srv, ref_b, ckpts):
    before, want = _complete(srv), _complete(ref_b)
    assert before != want  # the two checkpoints write different text
    version = srv.http.get("/version").json()["weight_version"]
    assert srv.http.post("/sleep", params={"level": 2}).status_code == 200
    r = _update(srv, ckpts["b"])
    assert r.status_code == 409 and _error_code(r) == "weights_asleep"  # nothing to load into yet
    assert srv.http.post("/wake_up", params={"tags": "weights"}).json() == {"is_sleeping": True}
    srv.on = "b"
    r = _update(srv, ckpts["b"])  # slime's order: weights, update, KV cache
    assert r.status_code == 200 and r.json()["success"] and r.json()["weight_version"] == version + 1, r.text
    assert _chat(srv).status_code == 503  # the cache still sleeps
    srv.http.post("/wake_up", params={"tags": "kv_cache"})
    assert _complete(srv) == want
    assert srv.http.get("/version").json()["weight_version"] == version + 1
    assert _metric(srv, 'glm5_weight_updates_total{outcome="success"}') >= 1
    assert _metric(srv, "glm5_weight_version ") == version + 1


def test_update_while_awake_forgets_the_prefix_cache(srv, ref_b, ckpts):
    long = "The king of the hill " * 12  # several cache blocks
    _complete(srv, long)
    assert _complete(srv, long) == _complete(srv, long)  # A's latents of this prompt are in the prefix cache now
    srv.on = "b"
    assert _update(srv, ckpts["b"]).status_code == 200
    # B's prompt latents, not A's cached ones
    assert _complete(srv, long) == _complete(ref_b, long)


def test_level2_without_new_weights_refuses_generation_until_they_are_loaded(srv, ckpts):
    before = _complete(srv)
    srv.http.post("/sleep", params={"level": 2})
    assert srv.http.post("/wake_up").json() == {"is_sleeping": False}
    r = _chat(srv)
    assert r.status_code == 503 and _error_code(r) == "weights_not_loaded", r.text
    assert srv.http.get("/health").json()["status"] == "sleeping"
    assert _update(srv, ckpts["a"]).status_code == 200  # while awake: the plain update path
    assert _complete(srv) == before


@pytest.mark.parametrize("name", ["missing", "file", "empty", "wide", "rope", "no_mtp", "lying", "truncated"])
def test_bad_checkpoints_are_400_and_the_old_weights_keep_serving(srv, ckpts, name):
    path = {"missing": ckpts["empty"] / "nowhere", "file": ckpts["a"] / "config.json"}.get(name) or ckpts[name]
    before = _complete(srv)
    version = srv.http.get("/version").json()["weight_version"]
    r = _update(srv, path)
    body = r.json()
    assert r.status_code == 400 and body["success"] is False and body["weight_version"] == version, r.text
    assert body["error"]["message"] == body["message"]
    if name in ("wide", "rope", "no_mtp"):
        assert body["error"]["code"] == "config_mismatch"
        assert {"wide": "hidden_size", "rope": "rope_parameters", "no_mtp": "missing"}[name] in body["message"]
    assert _complete(srv) == before
    assert srv.http.get("/version").json()["weight_version"] == version


def test_update_with_requests_in_flight_is_409_unless_they_are_aborted(srv, ckpts, monkeypatch):
    before = _complete(srv)
    _slow_steps(monkeypatch, srv)
    client, resp, lines = _open_stream(srv, max_tokens=300)
    try:
        r = _update(srv, ckpts["a"])
        assert r.status_code == 409 and r.json()["success"] is False
        assert r.json()["error"]["code"] == "requests_in_flight"
        r = _update(srv, ckpts["a"], abort_all_requests=True)
        assert r.status_code == 200 and r.json()["success"], r.text
        reason, text = _finish(lines)
        assert reason == "abort"
    finally:
        resp.close()
        client.close()
    monkeypatch.undo()
    assert _complete(srv) == before


# ------------------------------------------------------------------------------------------------------ FP8
@pytest.fixture(scope="module")
def fp8_ckpts(ckpts, tmp_path_factory):
    from glm5.checkpoint.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("admin_fp8")
    out = {}
    for name in ("a", "b"):
        quantize_checkpoint(ckpts[name], root / name)
        for f in ckpts[name].iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, root / name / f.name)
        out[name] = root / name
    return out


def _offline(path, prompt="The king of the hill", **kw) -> str:
    from glm5.engine import LLM, SamplingParams

    llm = LLM(str(path), max_model_len=512, **kw)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def test_an_fp8_checkpoint_loads_as_the_startup_fp8_mode_loads_it(srv, ckpts, fp8_ckpts):
    # the server loaded a BF16/FP32 checkpoint with --fp8 dequantize (the default): an FP8 one is dequantised
    srv.on = "b_fp8"
    assert _update(srv, fp8_ckpts["b"]).status_code == 200
    assert _complete(srv) == _offline(fp8_ckpts["b"])
    # a server that keeps FP8 weights (--fp8 keep) takes FP8 checkpoints, and refuses a BF16 one by name
    from glm5.serve.admin import AdminOptions
    from glm5.serve.app import create_app
    from glm5.serve.backend import EngineBackend
    from glm5.serve.settings import ServeSettings

    backend = EngineBackend.from_pretrained(str(fp8_ckpts["a"]), max_model_len=512, max_num_seqs=8, seed=0,
                                            fp8="keep")
    app = create_app(backend, ServeSettings(served_model_names=[MODEL_NAME], api_key=API_KEY),
                     AdminOptions(weight_updates=True))
    with ServerThread(app) as keep:
        keep.http = httpx.Client(base_url=keep.url, headers=AUTH, timeout=60)
        before = _complete(keep)
        r = _update(keep, ckpts["b"])
        assert r.status_code == 400 and "weight_scale_inv" in r.json()["message"], r.text
        assert _complete(keep) == before
        assert _update(keep, fp8_ckpts["b"]).status_code == 200
        assert _complete(keep) == _offline(fp8_ckpts["b"], fp8="keep") != before
        keep.http.close()


def test_the_flags_are_off_by_default_and_parse():
    from glm5.cli import build_parser
    from glm5.serve.admin import AdminOptions
    from glm5.serve.cli import admin_options_from_args

    def options(*flags):
        return admin_options_from_args(build_parser("serve").parse_args(["serve", "--model", "/x", *flags]))

    assert options() == AdminOptions() and not options().any
    assert options("--enable-sleep-mode") == AdminOptions(sleep_mode=True)
    assert options("--enable-weight-updates", "--enable-sleep-mode") == AdminOptions(True, True)
