"""The paint page's server (sample/serve.py over sample/studio.py) through its HTTP API: a call
reports every step with the expert in use, its download reproduces it with `python -m sample`,
bad input is answered with a message while the server keeps serving, Ctrl-C stops it. The page
itself in headless Chromium is tests/test_serve_browser.py."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image

from sample.serve import make_server
from sample.studio import PretrainedStudio, ProjectStudio, RequestError, parse_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "pretrained", "tiny-shapes")
TINY_SD = os.path.join(ROOT, "tests", "fixtures", "diffusers", "tiny_sd")
RED, BLUE = "#e6194b", "#4363d8"


def halves_canvas(h=64, w=64, left=RED, right=BLUE) -> str:
    """A colour map as the page sends it: left half one colour, right half the other."""
    canvas = np.full((h, w, 3), 255, np.uint8)
    canvas[:, : w // 2] = list(bytes.fromhex(left[1:]))
    if right:
        canvas[:, w // 2:] = list(bytes.fromhex(right[1:]))
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def painted_request(**kw) -> dict:
    body = dict(prompt="a red circle and a blue square", num=2, seed=5, steps=6,
                sampler="euler", guidance_scale=2.5, paint_scale=2.0, canvas=halves_canvas(),
                regions=[dict(colour=RED, phrase="red circle", strength=1.0),
                         dict(colour=BLUE, phrase="blue square", strength=1.5)])
    body.update(kw)
    return body


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory):
    """The shipped model split at the median noise level into an ensemble of two experts (the
    same weights, so only the plan and the reported expert change)."""
    root = tmp_path_factory.mktemp("experts")
    for name, q in (("low", ["0", "1/2"]), ("high", ["1/2", "1"])):
        shutil.copytree(SHIPPED, root / name)
        config = json.loads((root / name / "config.json").read_text())
        config["train"]["sigma_quantiles"] = q
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "ensemble.json").write_text(json.dumps({"experts": ["low", "high"]}))
    return str(root / "ensemble.json")


@pytest.fixture(scope="module")
def studio(two_experts):
    return ProjectStudio(two_experts)


@pytest.fixture(scope="module")
def server(studio):
    srv = make_server(studio, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def call(base, path, body=None, raw=None):
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            payload = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        payload, status = e.read(), e.code
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


def wait_done(base, job, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        status, state = call(base, f"/api/jobs/{job}")
        assert status == 200
        if state["state"] in ("done", "error"):
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def test_progress_names_each_step_and_the_expert_that_takes_it(studio):
    checked = studio.check(parse_request(painted_request(), studio.defaults))
    plan = checked.plans[0]
    boundary = math.exp(-1.2)  # the median of EDM's log-normal p(sigma), P_mean = -1.2
    assert len(plan.segments) >= 2  # the switch between the two experts
    heard = []
    images = studio.run(checked, heard.append)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert [p["step"] for p in heard] == list(range(1, 7))
    for p in heard:
        sigma = plan.sigmas[p["step"] - 1]
        assert p["sigma"] == pytest.approx(sigma)
        assert p["experts"][0] == (0 if sigma < boundary else 1)
        segment = plan.segments[p["segment"]]
        assert segment.start < p["step"] <= segment.stop
    assert {p["experts"][0] for p in heard} == {0, 1}


def test_a_call_over_http_and_its_download_reproduce_with_the_command_line(server, tmp_path,
                                                                            monkeypatch):
    status, answer = call(server, "/api/sample", painted_request())
    assert status == 200, answer
    assert [s["experts"][0] for s in answer["plan"][0]] == [1, 0]
    state = wait_done(server, answer["job"])
    assert state["state"] == "done" and state["images"] == 2
    assert state["progress"]["step"] == state["progress"]["steps"] == 6
    served = [np.asarray(Image.open(io.BytesIO(call(server, f"/api/jobs/{answer['job']}/{i}.png")[1])))
              for i in range(2)]
    status, bundle = call(server, f"/api/jobs/{answer['job']}/call.zip")
    assert status == 200
    zipfile.ZipFile(io.BytesIO(bundle)).extractall(tmp_path)
    assert json.loads((tmp_path / "words.json").read_text()) == {
        "#ffffff": "background", RED: "red circle,1", BLUE: "blue square,1.5"}
    command = shlex.split((tmp_path / "command.txt").read_text())
    assert command == answer["command"] and command[:3] == ["python", "-m", "sample"]
    zipped = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in zipped] == ["0000_a_red_circle_and_a_blue_square.png",
                                        "0001_a_red_circle_and_a_blue_square.png"]
    for img, path in zip(served, zipped):
        np.testing.assert_array_equal(img, np.asarray(Image.open(path)))

    # The command, run where the zip unpacked, makes the same images.
    from sample.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(command[3:] + ["--out", "again"]) == 0
    for img, path in zip(served, zipped):
        np.testing.assert_array_equal(img, np.asarray(Image.open(tmp_path / "again" / path.name)))


@pytest.mark.parametrize("change, message", [
    (dict(regions=[dict(colour=RED, phrase="green triangle"),
                   dict(colour=BLUE, phrase="blue square")]), "green triangle"),
    (dict(regions=[dict(colour=RED, phrase="red circle")]), "does not name: #4363d8"),
    (dict(canvas=halves_canvas(left="#ffffff", right=None)), "not on the canvas"),
    (dict(height=4096, width=4096), "outside what this model makes"),
    (dict(height=30, width=30), "multiple of 4"),
    (dict(height=64, width=32), "square"),
    (dict(num=100), "number of samples"),
    (dict(seed=-1), "seed"),
    (dict(sampler="ddim"), "sampler"),
    (dict(negative_prompt="blurry"), "no negative prompt"),
    (dict(style=halves_canvas()), "style image"),
    (dict(colour_map="x"), "unknown request keys"),
    (dict(regions=[dict(colour="#ffffff", phrase="red circle")]), "white is the background"),
    (dict(regions=[dict(colour="red", phrase="red circle")]), "#rrggbb"),
    (dict(regions=[dict(colour=RED, phrase=" ")]), "no phrase"),
    (dict(canvas="data:image/png;base64,AAAA"), "not a readable image"),
    (dict(prompt=""), "write a prompt"),
    (dict(steps="ten"), "steps must be int"),
])
def test_bad_input_is_answered_with_its_message_and_the_server_keeps_serving(server, change,
                                                                            message):
    body = painted_request(**change)
    for path in ("/api/check", "/api/sample"):
        status, answer = call(server, path, body)
        assert status == 400 and message in answer["error"], answer
    status, info = call(server, "/api/info")
    assert status == 200 and info["native"] == [32, 32]


def test_not_json_unknown_paths_and_unfinished_jobs(server):
    status, answer = call(server, "/api/sample", raw=b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    assert call(server, "/api/jobs/999")[0] == 404
    assert call(server, "/nothing")[0] == 404
    assert call(server, "/api/info")[0] == 200
    status, page = call(server, "/")
    assert status == 200 and b'<canvas id="canvas"' in page


def test_a_model_that_cannot_paint_says_so(two_experts, tmp_path):
    cascade = tmp_path / "cascade.json"
    cascade.write_text(json.dumps({"stages": [{"ensemble": two_experts, "paint": False}]}))
    studio = ProjectStudio(str(cascade))
    assert not studio.info()["can_paint"]
    with pytest.raises(RequestError, match="cannot paint"):
        studio.check(parse_request(painted_request(), studio.defaults))
    unpainted = {k: v for k, v in painted_request().items() if k not in ("canvas", "regions")}
    assert studio.check(parse_request(unpainted, studio.defaults)).paint is None


def test_pretrained_pipeline_with_negative_prompt_and_paint_matches_its_command(tmp_path,
                                                                                monkeypatch):
    studio = PretrainedStudio(TINY_SD)
    info = studio.info()
    assert info["has_negative"] and not info["square"] and not info["has_style"]
    body = painted_request(prompt="a red circle and a blue square", negative_prompt="blurry",
                           steps=3, num=1, height=64, width=32, canvas=halves_canvas(64, 32))
    checked = studio.check(parse_request(body, studio.defaults))
    heard = []
    images = studio.run(checked, heard.append)
    assert images.shape == (1, 64, 32, 3) and [p["step"] for p in heard] == [1, 2, 3]
    command = reproduce(studio, checked, images, tmp_path, monkeypatch)
    assert "--negative-prompt" in command and "--size" in command
    with pytest.raises(RequestError, match="style image"):
        studio.check(parse_request(dict(body, style=halves_canvas()), studio.defaults))


def test_the_command_starts_prints_its_address_and_stops_on_ctrl_c():
    """With no model named it serves the shipped paint model."""
    proc = subprocess.Popen([sys.executable, "-m", "sample.serve", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            assert line, "the server exited before serving"
        address = line.split(" at ")[1].split()[0].rstrip("/")
        info = call(address, "/api/info")[1]
        assert info["name"] == "paint-shapes" and info["can_paint"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopping" in out


def test_a_missing_model_is_an_error_before_serving(tmp_path):
    from sample.serve import main

    assert main(["--ensemble", str(tmp_path / "none"), "--port", "0"]) == 2


def reproduce(studio, checked, images, folder, monkeypatch):
    """The call's download, unpacked in `folder`: its command makes the same images."""
    from sample.__main__ import main

    zipfile.ZipFile(io.BytesIO(studio.bundle(checked.request, images))).extractall(folder)
    command = shlex.split((folder / "command.txt").read_text())
    monkeypatch.chdir(folder)
    assert main(command[3:] + ["--out", "again"]) == 0
    for i, img in enumerate(images):
        (made,) = (folder / "again").glob(f"{i:04d}_*.png")
        np.testing.assert_array_equal(img, np.asarray(Image.open(made)))
    return command


def test_past_the_native_size_with_scalecrafter_and_a_style_image(tmp_path, monkeypatch):
    """A model with a CLIP vision tower takes a style image; 2x its side samples with
    ScaleCrafter's re-dilation; both calls' commands make the same images."""
    from ediffi_jax.encoders.tiny import write_clip

    model = tmp_path / "styled"
    shutil.copytree(SHIPPED, model)
    write_clip(str(tmp_path / "clip"), width=8, projection=32)
    config = json.loads((model / "config.json").read_text())
    config["encoders"]["clip_vision"] = str(tmp_path / "clip")
    (model / "config.json").write_text(json.dumps(config))
    studio = ProjectStudio(str(model))
    assert studio.info()["has_style"]
    body = dict(prompt="a red circle", num=2, steps=4, height=64, width=64)
    checked = studio.check(parse_request(body, studio.defaults))
    assert any(s.settings.layers for s in checked.plans[0].segments)  # re-dilated convs
    big = studio.run(checked)
    assert big.shape == (2, 64, 64, 3)
    command = reproduce(studio, checked, big, tmp_path / "big", monkeypatch)
    assert command[command.index("--resolution"):][:4] == ["--resolution", "64", "--highres",
                                                            "scalecrafter"]
    styled = parse_request(dict(body, height=32, width=32, style=halves_canvas(32, 32)),
                           studio.defaults)
    checked = studio.check(styled)
    images = studio.run(checked)
    assert studio.command(styled)[-2:] == ["--style-image", "style.png"]
    names = zipfile.ZipFile(io.BytesIO(studio.bundle(styled, images))).namelist()
    assert "style.png" in names
    unstyled = studio.run(studio.check(dataclasses.replace(styled, style_image=None)))
    assert np.abs(unstyled.astype(int) - images.astype(int)).max() > 0
