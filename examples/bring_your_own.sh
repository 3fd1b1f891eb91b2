#!/usr/bin/env bash
# From your base model and LoRA adapter to a served posterior and an evaluation report.
#
#   examples/bring_your_own.sh BASE LORA CALIBRATION.jsonl TEST.jsonl OUT [tfb bayesianize flags...]
#
# BASE: a Hugging Face model directory (or smollm2-135m); LORA: a peft LoRA directory;
# CALIBRATION.jsonl: labelled items (README, "Calibration and evaluation files"); TEST.jsonl:
# other labelled items to evaluate on; OUT: a new directory for the results. Extra flags go to
# tfb bayesianize (--samples 4, --mode sequence, --device cpu, ...).
# Environment: TFB (default: tfb; e.g. .venv/bin/tfb), PYTHON (default: python3), PORT (default
# 8000), START_TIMEOUT (seconds the server may take to load; default 600).
#
# 1. tfb bayesianize: the scoring mode, sigma, T, the confidence and the held-out calibration,
#    ending with the fitting report (on stderr) -> OUT/posterior
# 2. tfb serve on OUT/posterior: /v1/posterior's verdict and one question from TEST.jsonl
#    answered over HTTP, then the server is stopped (SIGTERM: it drains and exits)
# 3. tfb eval on TEST.jsonl with the prediction sets' coverage -> OUT/eval.json
set -euo pipefail

if [ $# -lt 5 ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
model=$1 adapter=$2 calibration=$3 test=$4 out=$5
shift 5
read -r -a tfb <<< "${TFB:-tfb}"
python=${PYTHON:-python3}
port=${PORT:-8000}
mkdir -p "$out"

echo "== 1. tfb bayesianize" >&2
"${tfb[@]}" bayesianize --model "$model" --adapter "$adapter" --calibration "$calibration" \
    --out "$out/posterior" "$@"

echo "== 2. tfb serve on 127.0.0.1:$port" >&2
"${tfb[@]}" serve --model "$model" --adapter "$out/posterior" --host 127.0.0.1 --port "$port" \
    2> "$out/serve.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
"$python" - "$port" "$test" "$server" "${START_TIMEOUT:-600}" "$out/posterior" <<'PY'
import json, os, sys, time, urllib.error, urllib.request

port, test, server, timeout, posterior_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
url = f"http://127.0.0.1:{port}"


def get(path):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.load(r)


deadline = time.monotonic() + timeout
while True:  # /health is 200 once the posterior is loaded
    try:
        if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
            break
    except (urllib.error.URLError, ConnectionError):
        pass
    try:
        os.kill(server, 0)
    except ProcessLookupError:
        sys.exit("tfb serve exited before it was ready; its log is serve.log in the output directory")
    if time.monotonic() > deadline:
        sys.exit(f"tfb serve was not ready after {timeout:g} s")
    time.sleep(0.5)

posterior = get("/v1/posterior")
recorded = json.load(open(os.path.join(posterior_dir, "tfb_config.json"), encoding="utf-8"))
if posterior["files_sha256"] != recorded["files_sha256"]:  # another server had the port
    sys.exit(f"port {port} is answered by another server, not by this posterior: choose another PORT")
report = posterior.get("fit_report") or {}
print(f"served model {posterior['model']!r}: sigma {posterior['sigma']:.4g}, T {posterior['temperature']:.3g}, "
      f"mode {posterior['mode']}; {report.get('verdict', 'no fitting report')}")
item = json.loads(next(line for line in open(test, encoding="utf-8") if line.strip()))
body = {k: item[k] for k in ("question", "prompt", "choices") if k in item}
request = urllib.request.Request(url + "/v1/choices", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=300) as r:
    answer = json.load(r)
shown = {k: answer.get(k) for k in ("choice", "probs", "uncertainty", "prediction_set", "abstain",
                                     "abstain_reasons", "model")}
print(f"{body.get('question') or body.get('prompt')!r} (answer: {item.get('answer')!r}):")
print(json.dumps(shown, indent=2))
PY
kill "$server"
wait "$server" || true
trap - EXIT

echo "== 3. tfb eval on $test" >&2
"${tfb[@]}" eval --model "$model" --adapter "$out/posterior" --data "$test" --coverage --json "$out/eval.json"
echo "posterior: $out/posterior (its report: fit_report in tfb_config.json); evaluation: $out/eval.json" >&2
