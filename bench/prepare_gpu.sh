#!/usr/bin/env bash
# What `bench/serve.py --preset gpu` needs on the GPU machine, prepared on a CPU machine with
# internet access to PyPI (the GPU machine has none):
#   .whl/  wheels (Python 3.12, manylinux x86_64) of the server's packages the GPU image lacks:
#          fastapi, starlette, uvicorn, pydantic(-core, -settings), python-dotenv, annotated-types,
#          typing-inspection, typing-extensions, annotated-doc, opentelemetry-api, gguf, httptools
#          (uvicorn's fast HTTP parser; uvloop is in the image) and py-spy (for --profile); the
#          versions installed in the local environment (the ones tested), ~8 MB
#   .tok/  SmolLM2's tokenizer (the random model's vocabulary), ~3.5 MB
# Both are added to the checkout's .git/info/exclude: they travel with `carry`, not with git.
#
# Usage, from the repository root:  bench/prepare_gpu.sh [DEST]   (DEST: default the root)
#   PY=/path/to/python  the environment with tfb installed (default .venv/bin/python)
# Then on the GPU machine (bench/README.md has the exact command):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site TFB_TOKENIZER=.tok python3 bench/serve.py --preset gpu
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-.venv/bin/python}
DEST=${1:-.}
PACKAGES="fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv annotated-types
typing-inspection typing-extensions annotated-doc opentelemetry-api gguf httptools py-spy"

if [ "$DEST" = "." ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    for d in /.whl/ /.tok/; do
        grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"
    done
fi

# the locally installed versions: NAME==VERSION each
pins=$("$PY" - $PACKAGES <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))
EOF
)
echo "wheels: $pins"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" $pins
# one version of each package in .whl (two stop pip's install there): replace older ones
mkdir -p "$DEST/.whl"
for f in "$tmp"/*.whl; do
    project=$(basename "$f" | cut -d- -f1)
    rm -f "$DEST/.whl/$project"-[0-9]*.whl
    mv "$f" "$DEST/.whl/"
done

"$PY" - "$DEST/.tok" <<'EOF'
import sys
from transformers import AutoTokenizer
from tfb_core.models import resolve_model_dir  # the demo's converted model (converted once if needed)
AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m")).save_pretrained(sys.argv[1])
EOF
du -sh "$DEST/.whl" "$DEST/.tok"
ls "$DEST/.whl"
