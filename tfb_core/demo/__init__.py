"""The built-in demo: SmolLM2-135M-Instruct with a LoRA adapter trained by this project.

``tfb serve`` and ``tfb eval`` with no model arguments use these. The files, and the exact
commands that made them, are in this folder (README.md).
"""

from pathlib import Path

DEMO_MODEL = "smollm2-135m"
DEMO_DIR = Path(__file__).parent
DEMO_ADAPTER = DEMO_DIR / "adapter"  # the plain (MLE) LoRA adapter
DEMO_POSTERIOR = DEMO_DIR / "posterior"  # its Bayesianized directory (tfb bayesianize)
