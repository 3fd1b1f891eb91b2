"""examples/: the worked example end to end on the tiny Llama (a real tfb bayesianize, tfb serve
over HTTP and tfb eval, run by the script as a user runs it), and its question files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from server_helpers import free_port

from tfb_core.data import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_the_question_files_are_the_scripts_and_their_answers_are_right(tmp_path):
    for name, n in (("questions.jsonl", 40), ("test_questions.jsonl", 20)):
        items = read_jsonl(EXAMPLES / name)
        assert len(items) == n and all(len(it.choices) == 4 for it in items)
        for it in items:  # hand-checkable: the answer is the arithmetic's result
            a, op, b = re.fullmatch(r"What is (\d+) ([-+x]) (\d+)\?", it.question).groups()
            a, b = int(a), int(b)
            assert it.choices[it.answer] == str({"+": a + b, "-": a - b, "x": a * b}[op]), it
    # the committed files are what the script writes
    copy = tmp_path / "examples"
    copy.mkdir()
    (copy / "make_questions.py").write_text((EXAMPLES / "make_questions.py").read_text())
    subprocess.run([sys.executable, str(copy / "make_questions.py")], check=True, capture_output=True, timeout=60)
    for name in ("questions.jsonl", "test_questions.jsonl"):
        assert (copy / name).read_text() == (EXAMPLES / name).read_text(), name


def test_bring_your_own_end_to_end(llama_dir, lora_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TFB": f"{sys.executable} -m server.cli", "PYTHON": sys.executable,
           "PORT": str(free_port()), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TFB_DEVICE": "cpu",
           "START_TIMEOUT": "300"}
    proc = subprocess.run(["bash", str(EXAMPLES / "bring_your_own.sh"), str(llama_dir), str(lora_dir),
                           str(EXAMPLES / "questions.jsonl"), str(EXAMPLES / "test_questions.jsonl"), str(out),
                           "--samples", "2", "--sigma-grid", "0.01,0.05", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 1. the posterior and its report (the table on stderr)
    cfg = json.loads((out / "posterior" / "tfb_config.json").read_text())
    report = cfg["fit_report"]
    assert report["calibration_items"] == 40 and report["held_out"] == 20 and report["mode_choice"] == "measured"
    assert "tfb fit report" in proc.stderr and report["verdict"] in proc.stderr
    # 2. served: the posterior's numbers and an answer over HTTP, then a clean stop
    model = f"{llama_dir.name}+posterior"
    assert f"served model {model!r}: sigma {cfg['sigma']:.4g}" in proc.stdout
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "(answer: " in line) + 1
    answer = json.loads("\n".join(lines[start:lines.index("}", start) + 1]))
    assert answer["model"] == model and len(answer["probs"]) == 4 and answer["prediction_set"] is not None
    assert answer["choice"] in read_jsonl(EXAMPLES / "test_questions.jsonl")[0].choices
    # 3. tfb eval's report on the test file, with the prediction sets' coverage
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 20 and ev["mode"] == cfg["mode"] and ev["sets"]["0.9"] is not None
    assert "prediction sets at 0.9" in proc.stdout


def test_bring_your_own_stops_when_another_server_has_the_port(llama_dir, lora_dir, tmp_path):
    from server_helpers import ServerThread, bayesianized

    other = bayesianized(llama_dir, lora_dir, tmp_path / "other")
    with ServerThread(model=str(llama_dir), adapter=other, device="cpu", samples=2) as srv:
        env = {**os.environ, "TFB": f"{sys.executable} -m server.cli", "PYTHON": sys.executable,
               "PORT": str(srv.port), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TFB_DEVICE": "cpu"}
        proc = subprocess.run(["bash", str(EXAMPLES / "bring_your_own.sh"), str(llama_dir), str(lora_dir),
                               str(EXAMPLES / "questions.jsonl"), str(EXAMPLES / "test_questions.jsonl"),
                               str(tmp_path / "out"), "--sigma", "0.01", "--holdout", "0", "--mode", "letter",
                               "--samples", "2", "--device", "cpu"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last in (f"port {srv.port} is answered by another server, not by this posterior: choose another PORT",
                    "tfb serve exited before it was ready; its log is serve.log in the output directory"), last
    assert not (tmp_path / "out" / "eval.json").exists()
