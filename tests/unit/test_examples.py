"""The example workloads (``examples/aifactory_examples``) without a cluster: the inference
models and their input checks, the command context and its report lines, the knobs, what
``aifactory run`` adds to a job's environment, and that every sample names an example that
exists. Serving over HTTP is in tests/integration/test_examples_serving.py (sockets); training
in tests/integration/test_examples_ray.py (torch)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

from aifactory.controller.cli import ray_run
from aifactory.controller.core.errors import AifactoryError
from aifactory.controller.core.spec import JobSpec, Runtime
from aifactory.controller.inputs.workload import load_workload
from aifactory_examples import embed, serve, settings, sweep
from aifactory_examples.context import LATEST_FILE, REPORT_PREFIX, CommandContext

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the models


def test_the_trigram_model_continues_text_with_what_followed_in_its_corpus() -> None:
    model = serve.TrigramModel(serve.default_corpus())
    text = model.generate("The factory", 400, seed=3)
    assert len(text) == 400
    assert text == model.generate("The factory", 400, seed=3)
    assert text != model.generate("The factory", 400, seed=4)
    # every character follows its two-character context somewhere in the corpus
    context = "The factory"
    for char in text:
        assert (context[-2:] + char) in model.text, context[-2:] + char
        context += char


def test_the_embedder_puts_similar_texts_near_and_unrelated_ones_far() -> None:
    model = embed.HashedNgramEmbedder()
    cat, longer, cats, gpu = model.embed([
        "the cat sat on the mat", "the cat sat on the mat today", "a cat sat on a mat",
        "gradients all-reduced across the rack"])
    assert cat.shape == (embed.DIMENSIONS,)
    assert float(cat @ cat) == pytest.approx(1.0, abs=1e-5)
    assert float(cat @ longer) > float(cat @ cats) > float(cat @ gpu) + 0.2
    assert float(model.embed(["the cat sat on the mat"])[0] @ cat) == pytest.approx(1.0, abs=1e-5)


def test_bad_fields_are_named_with_what_would_be_valid() -> None:
    handle = serve.handler(serve.TrigramModel("a small corpus of text"))
    with pytest.raises(ValueError, match=r"max_tokens: expected an integer from 1 to 4096"):
        handle(b'{"max_tokens": 0}')
    with pytest.raises(ValueError, match=r"temperature: expected a number"):
        handle(b'{"temperature": "hot"}')
    with pytest.raises(ValueError, match=r"input: expected a string or a list"):
        embed.handler(embed.HashedNgramEmbedder())(b'{"input": [1, 2]}')
    assert json.loads(serve.factory(None)(b'{"max_tokens": 5}'))["tokens"] == 5


# --------------------------------------------------------------------------- the samples


def test_every_sample_names_an_example_that_exists() -> None:
    named = 0
    for arrival in load_workload(ROOT / "manifests" / "samples"):
        runtime = arrival.spec.runtime
        if runtime.entrypoint:
            module, _, attr = runtime.entrypoint.partition(":")
            assert callable(getattr(importlib.import_module(module), attr)), runtime.entrypoint
        else:
            assert runtime.command[:2] == ("python", "-m"), runtime.command
            assert importlib.util.find_spec(runtime.command[2]) is not None, runtime.command
        named += 1
    assert named >= 8


def test_the_examples_speak_the_workers_protocol() -> None:
    pytest.importorskip("ray")
    from aifactory.controller.backends.ray import worker

    assert (REPORT_PREFIX, LATEST_FILE) == (worker.REPORT_PREFIX, worker.LATEST_FILE)
    assert settings.FAST_ENV == ray_run.FAST_ENV


def test_a_command_reports_lines_and_rank_0_records_its_latest_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = CommandContext({"RANK": "0", "WORLD_SIZE": "2", "AIFACTORY_ATTEMPT": "1",
                          "AIFACTORY_CHECKPOINT_DIR": str(tmp_path)})
    assert (ctx.rank, ctx.world_size, ctx.attempt, ctx.latest_checkpoint) == (0, 2, 1, None)
    ctx.report(progress=0.5, checkpoint=str(tmp_path / "step-10.pt"), loss=0.25)
    line = capsys.readouterr().out.strip()
    assert line.startswith(REPORT_PREFIX)
    assert json.loads(line[len(REPORT_PREFIX):]) == {
        "progress": 0.5, "checkpoint": str(tmp_path / "step-10.pt"), "loss": 0.25}
    assert ctx.latest_checkpoint == str(tmp_path / "step-10.pt")
    other = CommandContext({"RANK": "1", "AIFACTORY_CHECKPOINT_DIR": str(tmp_path)})
    other.report(checkpoint=str(tmp_path / "step-20.pt"))
    assert ctx.latest_checkpoint == str(tmp_path / "step-10.pt")  # only rank 0's counts


def test_training_without_torch_fails_saying_what_to_install(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is importable here")
    from aifactory_examples import train
    from aifactory_examples.training import TorchMissing

    ctx = CommandContext({"AIFACTORY_CHECKPOINT_DIR": str(tmp_path)})
    with pytest.raises(TorchMissing, match=r"needs PyTorch on the worker.*pip install torch.*"
                                           r"--pythonpath ~/.cache/aifactory/torch"):
        train.main(ctx)


# --------------------------------------------------------------------------- knobs


def test_fast_mode_cuts_steps_and_knobs_name_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.FAST_ENV, raising=False)
    assert settings.steps(2000) == 2000
    monkeypatch.setenv(settings.FAST_ENV, "1")
    assert settings.steps(2000) == 80
    assert settings.steps(100) == settings.FAST_MIN_STEPS
    monkeypatch.setenv("STEPS", "ten")
    with pytest.raises(ValueError, match="environment variable STEPS: expected an integer"):
        settings.env_int("STEPS", 1)
    monkeypatch.setenv("LRS", "0.1,fast")
    with pytest.raises(ValueError, match="environment variable LRS: expected comma-separated"):
        sweep.learning_rates()
    monkeypatch.setenv("LRS", "0.1, 0.01")
    assert sweep.learning_rates() == (0.1, 0.01)


# --------------------------------------------------------------------------- aifactory run


def _args(**given: object) -> argparse.Namespace:
    return argparse.Namespace(**{"env": [], "fast": False, "pythonpath": None, **given})


def test_aifactory_run_adds_environment_and_never_replaces_the_runtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ray_run.WORKER_PYTHONPATH_ENV, raising=False)
    spec = JobSpec(name="j", runtime=Runtime(entrypoint="aifactory_examples.train:main",
                                             env=(("PYTHONPATH", "/opt/own"), ("STEPS", "5"))))
    env, path = ray_run.job_environment(_args(env=["STEPS=9", "A=b=c"], fast=True,
                                              pythonpath=[str(tmp_path)]))
    assert env == {"STEPS": "9", "A": "b=c", "AIFACTORY_FAST": "1"}
    out = ray_run.with_environment(spec, env, path)
    assert out.runtime.entrypoint == spec.runtime.entrypoint
    assert dict(out.runtime.env) == {"PYTHONPATH": f"/opt/own{os.pathsep}{tmp_path}",
                                     "STEPS": "9", "A": "b=c", "AIFACTORY_FAST": "1"}
    assert ray_run.with_environment(spec, {}, ()) is spec
    monkeypatch.setenv(ray_run.WORKER_PYTHONPATH_ENV, str(tmp_path))
    assert ray_run.job_environment(_args()) == ({}, (str(tmp_path),))


@pytest.mark.parametrize(("given", "message"), [
    ({"env": ["NOVALUE"]}, "--env: expected KEY=VALUE"),
    ({"env": ["1X=2"]}, "--env: expected KEY=VALUE"),
    ({"pythonpath": ["/no/such/folder"]}, "--pythonpath: /no/such/folder is not a folder"),
], ids=["a variable without a value", "a name that is not a variable", "a missing folder"])
def test_aifactory_run_refuses_bad_flags_naming_them(given: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(AifactoryError, match=message):
        ray_run.job_environment(_args(**given))
