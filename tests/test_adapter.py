"""tfb_core.adapter and tfb_core.models: reading peft adapters, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import fresh_base, peft_model, read_lora

import tiny
from tfb_core.adapter import load_adapter
from tfb_core.errors import TFBError
from tfb_core.models import load_base_model
from tfb_core.posterior import Posterior

SUPPORTED = "torch.nn.Linear, transformers.pytorch_utils.Conv1D"


@pytest.fixture(scope="module")
def base(llama_dir):
    return fresh_base(llama_dir)


def copy_adapter(src, tmp_path, name="adapter"):
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# --- reading --------------------------------------------------------------------------------------


def test_load_adapter_reads_the_files(base, lora_dir):
    adapter = load_adapter(lora_dir, base.model)
    _, pairs = read_lora(lora_dir)
    names = [m.name for m in adapter.modules]
    order = [n for n, _ in base.model.named_modules() if n in pairs]
    assert names == order and len(names) == 7  # q, v, down x 2 layers + lm_head
    for m in adapter.modules:
        A, B = pairs[m.name]
        assert torch.equal(m.A.double(), A) and torch.equal(m.B.double(), B)
        assert m.scaling == 8 / 4


def test_bin_adapter_loads_through_weights_only(tmp_path, llama_dir):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    out = tiny.save_peft_adapter(llama_dir, tmp_path / "bin", cfg, safe_serialization=False)
    assert (out / "adapter_model.bin").is_file() and not (out / "adapter_model.safetensors").exists()
    post = Posterior.from_adapter(fresh_base(llama_dir), out)
    assert len(post.layers) == 4 and all(layer.scaling == 4.0 for layer in post.layers)
    ids = torch.tensor([post.tokenizer("A bin adapter, loaded safely").input_ids])
    with torch.no_grad():
        expected = peft_model(llama_dir, out)(input_ids=ids).logits
        got = post.model(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-5


class NotATensor:  # any object a plain tensor file must not contain
    def __reduce__(self):
        return (open, (str(MARKER), "w"))  # unpickling it would create MARKER


MARKER = None


def test_pickle_with_an_object_is_refused(tmp_path, base, lora_dir):
    global MARKER
    MARKER = tmp_path / "unpickled"
    out = copy_adapter(lora_dir, tmp_path)
    (out / "adapter_model.safetensors").unlink()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.save({key: NotATensor()}, out / "adapter_model.bin")
    with pytest.raises(TFBError, match="not a plain tensor file"):
        load_adapter(out, base.model)
    assert not MARKER.exists()


@pytest.mark.parametrize("value", ["a string", [1.0, 2.0], 3])
def test_non_tensor_values_are_refused(tmp_path, base, lora_dir, value):
    """weights_only lets plain Python values through: they are not LoRA weights either."""
    out = copy_adapter(lora_dir, tmp_path)
    (out / "adapter_model.safetensors").unlink()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.save({f"{prefix}.lora_A.weight": value, f"{prefix}.lora_B.weight": torch.zeros(64, 4)},
               out / "adapter_model.bin")
    with pytest.raises(TFBError, match="not a tensor") as e:
        load_adapter(out, base.model)
    assert "lora_A" in str(e.value)


def test_corrupt_safetensors(tmp_path, base, lora_dir):
    out = copy_adapter(lora_dir, tmp_path)
    data = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(TFBError, match="adapter_model.safetensors"):
        load_adapter(out, base.model)


# --- bad adapters -------------------------------------------------------------------------------


def test_missing_paths(tmp_path, base, llama_dir):
    with pytest.raises(TFBError, match="does not exist"):
        load_adapter(tmp_path / "nope", base.model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TFBError, match="empty: expected a peft LoRA adapter"):
        load_adapter(tmp_path / "empty", base.model)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(TFBError, match="not an adapter: it has no adapter_config.json.*holds notes.txt"):
        load_adapter(tmp_path / "other", base.model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TFBError, match="is a file, not a directory"):
        load_adapter(tmp_path / "file", base.model)
    with pytest.raises(TFBError, match="nope"):
        Posterior.from_adapter(base, tmp_path / "nope")


def test_no_weights_and_bad_json(tmp_path, base, lora_dir):
    out = copy_adapter(lora_dir, tmp_path)
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(TFBError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load_adapter(out, base.model)
    (out / "adapter_config.json").write_text("{oops")
    with pytest.raises(TFBError, match="invalid JSON"):
        load_adapter(out, base.model)


def test_adapter_for_another_base_model(tmp_path, base):
    other = tiny.make_llama(tmp_path / "other", hidden=32)
    lora = tiny.make_lora(other, tmp_path / "lora", targets=("q_proj",))
    with pytest.raises(TFBError) as e:
        load_adapter(lora, base.model)
    msg = str(e.value)
    assert "another base model" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "lora_A (4, 32)" in msg and "64 -> 64" in msg


def test_adapter_for_another_architecture(base, gpt2_lora_dir):
    with pytest.raises(TFBError, match=r"another base model: module transformer\.h\.0\.attn\.c_attn does not exist"):
        load_adapter(gpt2_lora_dir, base.model)


def test_ia3_adapter_is_refused(tmp_path, base, llama_dir):
    from peft import IA3Config

    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    out = tiny.save_peft_adapter(llama_dir, tmp_path / "ia3", cfg)
    with pytest.raises(TFBError, match="adapter type 'IA3' is not supported.*LoRA"):
        load_adapter(out, base.model)


@pytest.mark.parametrize("changes,problem", [
    ({"peft_type": "LOHA"}, "adapter type 'LOHA' is not supported"),
    ({"use_dora": True}, "DoRA is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all' is not supported; allowed: 'none'"),
])
def test_unsupported_config(tmp_path, base, lora_dir, changes, problem):
    out = copy_adapter(lora_dir, tmp_path)
    edit_config(out, **changes)
    with pytest.raises(TFBError, match=problem.replace("(", r"\(")):
        load_adapter(out, base.model)


def test_lora_on_an_embedding_lists_supported_layers(tmp_path, base, llama_dir):
    out = tiny.make_lora(llama_dir, tmp_path / "emb", targets=("embed_tokens", "q_proj"))
    with pytest.raises(TFBError) as e:
        load_adapter(out, base.model)
    assert "embed" in str(e.value) and SUPPORTED in str(e.value)


def test_half_a_pair(tmp_path, base, lora_dir):
    from safetensors.torch import load_file, save_file

    out = copy_adapter(lora_dir, tmp_path)
    state = load_file(out / "adapter_model.safetensors")
    del state["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    save_file(state, out / "adapter_model.safetensors")
    with pytest.raises(TFBError, match="model.layers.1.mlp.down_proj has lora_A but not its pair"):
        load_adapter(out, base.model)


# --- base models --------------------------------------------------------------------------------


def test_base_model_errors(tmp_path, llama_dir):
    with pytest.raises(TFBError, match="neither a directory nor a built-in model; built-ins: smollm2-135m"):
        load_base_model(tmp_path / "missing")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(TFBError, match="no config.json"):
        load_base_model(tmp_path / "noconfig")
    with pytest.raises(TFBError, match="unknown dtype 'float8'; allowed: float32"):
        load_base_model(llama_dir, device="cpu", dtype="float8")


def test_base_model_loads_float32_on_cpu(llama_dir):
    base = load_base_model(llama_dir, device="cpu", dtype="float32")
    assert next(base.model.parameters()).dtype == torch.float32
    assert not base.model.training and base.tokenizer.pad_token_id is not None
    assert base.path == llama_dir


def test_tied_embeddings_with_lora_on_lm_head(tmp_path, llama_dir):
    """SmolLM2 ties lm_head to embed_tokens; peft then saves lm_head.base_layer.weight too."""
    from safetensors.torch import load_file

    base_dir = tiny.make_llama(tmp_path / "tied", tie_word_embeddings=True)
    lora = tiny.make_lora(base_dir, tmp_path / "lora", targets=("q_proj", "lm_head"))
    assert "base_model.model.lm_head.base_layer.weight" in load_file(lora / "adapter_model.safetensors")
    post = Posterior.from_adapter(fresh_base(base_dir), lora)
    assert [layer.name for layer in post.layers][-1] == "lm_head"
    ids = torch.tensor([post.tokenizer("Tied embeddings, as in SmolLM2").input_ids])
    with torch.no_grad():
        expected = peft_model(base_dir, lora)(input_ids=ids).logits
        assert (post.model(input_ids=ids).logits - expected).abs().max().item() < 1e-5
        post.sigma = 0.05
        out = post.save(tmp_path / "bayes")
        with post.samples(num_samples=2, seed=1):
            sampled = post.model(input_ids=ids.repeat(2, 1)).logits
        again = Posterior.load(fresh_base(base_dir), out)
        with again.samples(num_samples=2, seed=1):
            assert torch.equal(again.model(input_ids=ids.repeat(2, 1)).logits, sampled)
        assert (peft_model(base_dir, out)(input_ids=ids).logits - expected).abs().max().item() < 1e-5
    # a changed (not tied-and-equal) full weight is still refused
    state = load_file(lora / "adapter_model.safetensors")
    state["base_model.model.lm_head.base_layer.weight"] += 1.0
    from safetensors.torch import save_file

    save_file(state, lora / "adapter_model.safetensors")
    with pytest.raises(TFBError, match="lm_head.base_layer.weight"):
        load_adapter(lora, fresh_base(base_dir).model)


def test_bfloat16_base_with_lora_on_lm_head(llama_dir, lora_dir):
    """The CUDA default dtype: peft's fp32 copy of lm_head equals the bf16 base after rounding."""
    base = load_base_model(llama_dir, device="cpu", dtype="bfloat16")
    post = Posterior.from_adapter(base, lora_dir)
    assert post.layers[-1].name == "lm_head" and post.layers[-1].lora_A.dtype == torch.bfloat16
    ref = Posterior.from_adapter(fresh_base(llama_dir), lora_dir)
    ids = torch.tensor([post.tokenizer("Half precision on a GPU").input_ids])
    with torch.no_grad():
        with post.samples(num_samples=2, seed=0, sigma=0.05):
            low = post.model(input_ids=ids.repeat(2, 1)).logits.float()
        with ref.samples(num_samples=2, seed=0, sigma=0.05):
            high = ref.model(input_ids=ids.repeat(2, 1)).logits
    assert (low - high).abs().max().item() < 0.05 * high.abs().max().item()  # bf16 rounding only
