"""lmms-eval's model ``lightkv`` (``lightkv_adapters.lmms_eval``) through the real ``lmms-eval`` command line,
offline: a shapes-world task written by the test (``helpers.lmms_task``), the model found through its entry point,
the scores file and the per-request statistics file checked.

- The shipped tiny LVLM (``pretrained=lightkv-tiny``): lmms-eval's scores equal ``lightkv eval``'s on the same
  questions, for the full cache and three methods at one retention target, and the recorded retention equals the
  retention ``lightkv eval`` measures.
- Tiny random-weight Qwen2.5-VL, Qwen2-VL, LLaVA and LLaVA-NeXT checkpoints saved with offline processors
  (``helpers.live_models``): every answer lmms-eval logs (batches of two, left-padded) equals ``generate()`` of the
  Transformers adapter on the prompt alone (``tests/live/hf_reference.py``), and the recorded retention equals the
  adapter's own statistics. Their image processors need torchvision: these runs get the live servers' environment.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed (pip install 'lightkv[eval]')", allow_module_level=True)

from helpers import live_models  # noqa: E402
from helpers.live_server import live_env  # noqa: E402
from helpers.lmms_task import write_shapes_task  # noqa: E402

from lightkv_adapters.reference import quality  # noqa: E402
from lightkv_adapters.reference import shapes_world as world  # noqa: E402

PER_TYPE = 4  # 20 questions
RETENTION = 0.25
TINY_METHODS = ("fastv", "lightkv", "prefixkv")
LMMS_TIMEOUT_S = 600
LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))


def child_env() -> dict[str, str]:
    """Every child process of these tests: offline, with the image processors' torchvision (the live servers'
    environment, ``helpers.live_server.live_env``), and the kernels' PyTorch fallbacks (the Triton interpreter
    would only slow the runs down: the kernels are tested against their oracle elsewhere, and both sides of every
    comparison here run the same backend)."""
    return live_env({"HF_DATASETS_OFFLINE": "1", "TRITON_INTERPRET": "0"})


def lmms_eval(task_dir: Path, task: str, model_args: str, out: Path, batch: int) -> dict:
    """Run ``lmms-eval --model lightkv`` on ``task``; returns the results JSON it wrote."""
    command = [
        LMMS_EVAL, "--model", "lightkv", "--model_args", model_args, "--tasks", task, "--include_path", str(task_dir),
        "--batch_size", str(batch), "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=LMMS_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = sorted(out.rglob("*_results.json"))
    assert results, f"lmms-eval wrote no results under {out}:\n{run.stdout[-2000:]}"
    return json.loads(results[-1].read_text())


def logged_answers(out: Path, task: str) -> list[str]:
    """The answers lmms-eval logged for ``task`` (``--log_samples``), by doc id."""
    files = sorted(out.rglob(f"*samples_{task}*.jsonl"))
    assert files, f"no logged samples of {task} under {out}"
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return [row["filtered_resps"] for row in sorted(rows, key=lambda row: row["doc_id"])]


def stats(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda row: row["doc_id"])


@pytest.fixture(scope="module")
def shapes_pairs():
    return quality.held_out(PER_TYPE)


@pytest.fixture(scope="module")
def lightkv_eval(tmp_path_factory) -> dict:
    """``lightkv eval`` on the same questions: the summary it writes."""
    out = tmp_path_factory.mktemp("lightkv-eval")
    command = [
        str(Path(sys.executable).with_name("lightkv")), "eval", "--per-type", str(PER_TYPE),
        "--methods", ",".join(TINY_METHODS), "--retentions", str(RETENTION), "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=LMMS_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "quality.json").read_text())


@pytest.mark.parametrize("method", ["none", *TINY_METHODS])
def test_tiny_lvlm_scores_equal_lightkv_eval(method, shapes_pairs, lightkv_eval, tmp_path):
    task_dir = write_shapes_task(tmp_path / "task", shapes_pairs, "lightkv_shapes")
    stats_out = tmp_path / "stats.jsonl"
    args = f"pretrained=lightkv-tiny,method={method},stats_out={stats_out}"
    if method != "none":
        args += f",retention={RETENTION}"
    results = lmms_eval(task_dir, "lightkv_shapes", args, tmp_path / "out", batch=8)
    score = results["results"]["lightkv_shapes"]["exact_match,none"]
    key = f"{RETENTION:.2f}"
    expected = lightkv_eval["full"] if method == "none" else lightkv_eval["methods"][method][key]
    assert score == pytest.approx(expected, abs=1e-12), (method, score, expected)
    rows = stats(stats_out)
    assert [row["doc_id"] for row in rows] == list(range(len(shapes_pairs)))
    assert all(row["vision_tokens"] == world.GRID * world.GRID and row["batch_size"] <= 8 for row in rows)
    retention = sum(row["vision_retention"] for row in rows) / len(rows)
    measured = 1.0 if method == "none" else lightkv_eval["measured_retention"][method][key]
    assert retention == pytest.approx(measured, abs=1e-4)
    answers = logged_answers(tmp_path / "out", "lightkv_shapes")
    assert len(answers) == len(shapes_pairs) and all(answer.endswith(".") for answer in answers), answers


def _reference(model_dir: Path, method: str, task_dir: Path, out: Path) -> list[dict]:
    """``generate()`` of the Transformers adapter on each prompt of the task alone (tests/live/hf_reference.py, in
    the environment the lmms-eval run gets): tokens and vision retention per prompt."""
    rows = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    requests = []
    for row in rows:
        url = "data:image/png;base64," + base64.b64encode(Path(row["image"]).read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": row["question"]}]
        requests.append({"messages": [{"role": "user", "content": content}], "max_tokens": 4})
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps(requests))
    script = Path(__file__).parents[1] / "live" / "hf_reference.py"
    command = [sys.executable, str(script), str(model_dir), method, str(prompts), str(out / "reference.json")]
    run = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=LMMS_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "reference.json").read_text())


@pytest.mark.parametrize("family", live_models.TRANSFORMERS_FAMILIES)
def test_transformers_checkpoint_answers_as_the_adapter(family, shapes_pairs, tmp_path):
    from transformers import AutoTokenizer

    model_dir = live_models.save(family, tmp_path / "model", layout="transformers")
    pairs = shapes_pairs[:5]
    task_dir = write_shapes_task(tmp_path / "task", pairs, "lightkv_shapes_png", image_format="png")
    stats_out = tmp_path / "stats.jsonl"
    args = f"pretrained={model_dir},method=fastv,stats_out={stats_out},dtype=float32"
    results = lmms_eval(task_dir, "lightkv_shapes_png", args, tmp_path / "out", batch=2)
    reference = _reference(model_dir, "fastv", task_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answers = [tokenizer.decode(row["tokens"], skip_special_tokens=True) for row in reference]
    assert logged_answers(tmp_path / "out", "lightkv_shapes_png") == answers
    expected = sum(answer.strip() == " ".join(q.answer) for answer, (_, q) in zip(answers, pairs, strict=True))
    assert results["results"]["lightkv_shapes_png"]["exact_match,none"] == pytest.approx(expected / len(pairs))
    recorded = [row["vision_retention"] for row in stats(stats_out)]
    assert recorded == pytest.approx([row["vision_retention"] for row in reference], abs=1e-9)
    assert all(r < 1.0 for r in recorded)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"method": "nope"}, "method='nope' is not 'none' or one of"),
        ({"colour": "red"}, "unknown --model_args ['colour']"),
        ({"method": "fastv", "retention": "lots"}, "retention='lots' is not a number"),
        ({"method": "fastv", "retention": 1.5}, "retention=1.5 must lie in [0, 1]"),
        ({"method": "fastv", "retention": -0.1}, "must be at least 0.0"),
        ({"batch_size": 0}, "batch_size=0 must be at least 1"),
        ({"batch_size": "2.5"}, "batch_size='2.5' is not an integer"),
        ({"max_new_tokens": True}, "max_new_tokens=True is not a number"),
        ({"dtype": "float8"}, "dtype='float8' is not one of"),
        ({"method": "lightkv", "retention": 0.01}, "lightkv cannot reach retention=0.01 on lightkv-tiny"),
    ],
)
def test_bad_model_args_name_the_argument(args, message, tmp_path):
    from lightkv_adapters.lmms_eval import LightKVModel

    with pytest.raises(ValueError) as error:
        LightKVModel(pretrained="lightkv-tiny", stats_out=str(tmp_path / "stats.jsonl"), **args)
    assert message in str(error.value)


def test_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    from lightkv_adapters.lmms_eval import LightKVModel

    assert get_model("lightkv") is LightKVModel
