"""``tfb serve`` with faults in its model, for tests/test_stress.py: run as
``python tests/poisoned_serve.py serve ARGS``. The real CLI and loader; then, in the loaded
model, a token whose embedding is NaN (" quokka"), a token whose embedding raises (" narwhal"),
and a decode step that raises when a row reaches position 300 (as failing kernels would)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server.loader as loader  # noqa: E402

NAN_WORD, RAISE_WORD, POISON_POSITION = " quokka", " narwhal", 300
real_load = loader.load


def poison_embeddings(loaded):
    """In the loaded model: NAN_WORD's embedding is NaN, RAISE_WORD's raises (as a failing
    kernel would). Returns ``loaded``."""
    tok = loaded.post.tokenizer
    nan_id = tok(NAN_WORD, add_special_tokens=False).input_ids[-1]
    raise_id = tok(RAISE_WORD, add_special_tokens=False).input_ids[-1]

    def embed(module, args, output):
        ids = args[0]
        if (ids == raise_id).any():
            raise ValueError("poisoned token at /secret/local/path")
        return output.masked_fill((ids == nan_id)[..., None], float("nan"))

    loaded.post.model.get_input_embeddings().register_forward_hook(embed)
    return loaded


def poison_decode(loaded, position: int = POISON_POSITION):
    """In the loaded model: a decode step raises when a row reaches ``position`` (its rotary
    embedding raises, as a failing kernel would for one request's rows), in the eager engine's
    forward and the static engine's alike. Returns ``loaded``."""
    def rotary(module, args, kwargs):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if positions is not None and positions.shape[-1] == 1 and (positions == position).any():
            raise RuntimeError("kernel fault at /secret/local/path")

    loaded.post.model.model.rotary_emb.register_forward_pre_hook(rotary, with_kwargs=True)
    return loaded


def poisoned_load(settings, set_status):
    return poison_decode(poison_embeddings(real_load(settings, set_status)))


if __name__ in ("__main__", "__mp_main__"):  # (imported by the test for its constants: no patching then)
    # __mp_main__: the engine process (multiprocessing's spawn runs this file there first), which
    # loads the model with loader.load: the poisoned model is the one served
    loader.load = poisoned_load  # before server.app binds it as build_app's default
if __name__ == "__main__":
    import inspect

    import server.app
    from server.cli import main

    assert inspect.signature(server.app.build_app).parameters["load"].default is poisoned_load
    sys.exit(main(sys.argv[1:]))
