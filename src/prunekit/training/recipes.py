"""Training-time pruning recipes: one file states model, data, schedule, budget and training; `run_recipe` runs it.

A recipe is TOML (or YAML, if PyYAML is installed), for example:

```toml
seed = 0
out = "runs/lenet-mnist-gmp"          # optional; `prunekit train --out` overrides it

[model]
net = "lenet-300-100"                 # a prunekit.nets name

[data]
name = "mnist"                        # a prunekit.assets image set: mnist, fashion-mnist
train_subset = 10000                  # optional: this many training examples, drawn with subset_seed
test_subset = 2000                    # optional, likewise from the test split
subset_seed = 0                       # optional, default: seed

[schedule]
pruner = "gradual-magnitude"          # dense, one-shot, prune-at-init, gradual-magnitude,
frequency = 20                        #   iterative-magnitude, movement, rigl, set; then the pruner's arguments

[budget]
sparsity = 0.9                        # fraction of the prunable weights removed at the end
allocation = "global"                 # uniform, global, global-min, lamp, erk, er, owl

[optimizer]
name = "sgd"                          # sgd or adam
lr = 0.05
momentum = 0.9
weight_decay = 0.0
lr_schedule = "cosine"                # constant, cosine, step

[training]
epochs = 3                            # or steps = ...
batch_size = 128
pretrain_epochs = 0                   # dense epochs before the pruner is attached (one-shot, movement)
```

Step-valued pruner arguments that the recipe leaves out are derived from the length of the pruned phase and
recorded: gradual magnitude pruning runs from step 0 to 75% of the phase, every 1/20 of that span (Zhu & Gupta
2017 stop at about three quarters of training); movement pruning likewise but starts after 10% of the phase (its
scores are sums over steps); RigL/SET stop regrowing at 75% and update 10 times (Evci et al. 2020, §4).
Iterative magnitude pruning trains `rounds + 1` times (dense, then once per round), rewinding to `rewind_step`
between rounds; its budget in the record counts every round.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.allocation import ALLOCATIONS
from prunekit.artifacts import MANIFEST, atomic_directory
from prunekit.artifacts.files import check_safetensors, read_bounded_text
from prunekit.artifacts.io import MANIFEST_LIMIT, read_json_file
from prunekit.assets import ImageSet, image_asset_names, load_images
from prunekit.errors import PrunekitError
from prunekit.measure import ResourceMonitor, accuracy, result_record, sparsity_summary, weights_sha256
from prunekit.nets import NETS, build_net
from prunekit.training.loop import (
    LR_SCHEDULES,
    OPTIMIZERS,
    ClassificationData,
    TrainHistory,
    make_optimizer,
    train,
)

CHECKPOINT = "model.safetensors"
# Recipes are a few dozen lines; a bound keeps a hostile file from costing more than reading it.
RECIPE_LIMIT = 2**20
PLOT = "accuracy_vs_sparsity.png"
NUM_CLASSES = 10

# recipe schedule name -> (pruner class in prunekit.training, name of its sparsity argument, takes `allocation`)
SCHEDULES: dict[str, tuple[str | None, str | None, bool]] = {
    "dense": (None, None, False),
    "one-shot": ("OneShot", "sparsity", True),
    "prune-at-init": ("PruneAtInit", "sparsity", True),
    "gradual-magnitude": ("GradualMagnitude", "final_sparsity", True),
    "iterative-magnitude": ("IterativeMagnitude", "final_sparsity", True),
    "movement": ("Movement", "final_sparsity", False),
    "rigl": ("RigL", "sparsity", True),
    "set": ("SET", "sparsity", True),
}
# arguments the runner supplies itself: never written in a recipe
_SUPPLIED = {"model", "sparsity", "final_sparsity", "allocation", "input_shape", "optimizer"}
# schedules that act on a trained model and so may (one-shot: must) have a dense pre-training phase
_AFTER_TRAINING = {"one-shot", "movement", "gradual-magnitude"}

_SECTIONS = {
    "model": ("net",),
    "data": ("name", "train_subset", "test_subset", "subset_seed"),
    "budget": ("sparsity", "allocation"),
    "optimizer": ("name", "lr", "momentum", "weight_decay", "lr_schedule"),
    "training": ("epochs", "steps", "batch_size", "pretrain_epochs", "eval_every"),
}
_TOP = ("name", "seed", "out", "schedule", *_SECTIONS)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (see the module docstring for the file format); `as_dict()` gives the file's layout."""

    net: str
    data: str
    schedule: str
    sparsity: float = 0.0
    allocation: str | None = None
    schedule_args: dict = field(default_factory=dict)
    train_subset: int | None = None
    test_subset: int | None = None
    subset_seed: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 128
    pretrain_epochs: int = 0
    eval_every: int | None = None
    seed: int = 0
    name: str | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def as_dict(self) -> dict:
        """The recipe in the sectioned layout of its file (None values left out)."""
        flat = asdict(self)
        sections: dict[str, Any] = {k: flat[k] for k in ("name", "seed", "out") if flat[k] is not None}
        sections["model"] = {"net": self.net}
        sections["data"] = _present({"name": self.data, "train_subset": self.train_subset,
                                     "test_subset": self.test_subset, "subset_seed": self.subset_seed})
        sections["schedule"] = {"pruner": self.schedule, **self.schedule_args}
        sections["budget"] = _present({"sparsity": self.sparsity, "allocation": self.allocation})
        sections["optimizer"] = {"name": self.optimizer, "lr": self.lr, "momentum": self.momentum,
                                 "weight_decay": self.weight_decay, "lr_schedule": self.lr_schedule}
        sections["training"] = _present({"epochs": self.epochs, "steps": self.steps, "batch_size": self.batch_size,
                                         "pretrain_epochs": self.pretrain_epochs, "eval_every": self.eval_every})
        return sections


def _present(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pruner_class(schedule: str) -> type | None:
    class_name = SCHEDULES[schedule][0]
    if class_name is None:
        return None
    from prunekit import training  # imported here: prunekit.training re-exports this module

    return getattr(training, class_name)


def _schedule_parameters(schedule: str) -> dict[str, inspect.Parameter]:
    """The recipe-settable arguments of a schedule: its pruner's constructor minus what the runner supplies."""
    cls = _pruner_class(schedule)
    if cls is None:
        return {}
    params = {name: p for name, p in inspect.signature(cls).parameters.items()
              if name not in _SUPPLIED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if schedule == "prune-at-init":  # a count of training batches in a recipe, the batches themselves in Python
        params["batches"] = inspect.Parameter("batches", inspect.Parameter.KEYWORD_ONLY, default=1)
    return params


def _validate(r: Recipe) -> None:
    if r.net not in NETS:
        raise PrunekitError(f"recipe key 'model.net' = {r.net!r} is not a network; accepted: {', '.join(NETS)}")
    if r.data not in image_asset_names():
        raise PrunekitError(f"recipe key 'data.name' = {r.data!r} is not an image set; accepted: "
                            f"{', '.join(image_asset_names())}")
    for key, value, limit in (("data.train_subset", r.train_subset, 60000), ("data.test_subset", r.test_subset, 10000)):
        if value is not None and not (_is_int(value) and 1 <= value <= limit):
            raise PrunekitError(f"recipe key '{key}' = {value!r} must be an integer in [1, {limit}]")
    for key, value in (("seed", r.seed), ("data.subset_seed", r.subset_seed)):
        if value is not None and not (_is_int(value) and value >= 0):
            raise PrunekitError(f"recipe key '{key}' = {value!r} must be a non-negative integer")
    if r.schedule not in SCHEDULES:
        raise PrunekitError(f"recipe key 'schedule.pruner' = {r.schedule!r} is not a schedule; accepted: "
                            f"{', '.join(SCHEDULES)}")
    if not (_is_number(r.sparsity) and 0.0 <= r.sparsity < 1.0):
        raise PrunekitError(f"recipe key 'budget.sparsity' = {r.sparsity!r} must be a fraction removed in [0, 1)")
    if r.schedule == "dense" and r.sparsity != 0.0:
        raise PrunekitError(f"recipe key 'budget.sparsity' = {r.sparsity!r} needs a pruning schedule; "
                            "schedule 'dense' trains without pruning (sparsity 0)")
    if r.schedule != "dense" and r.sparsity == 0.0:
        raise PrunekitError(f"recipe key 'budget.sparsity' is 0 for schedule {r.schedule!r}; give a fraction in "
                            "(0, 1), or use schedule 'dense'")
    if r.allocation is not None and r.allocation not in ALLOCATIONS:
        raise PrunekitError(f"recipe key 'budget.allocation' = {r.allocation!r} is not an allocation; accepted: "
                            f"{', '.join(ALLOCATIONS)}")
    if not SCHEDULES[r.schedule][2] and r.allocation is not None:
        raise PrunekitError(f"recipe key 'budget.allocation' = {r.allocation!r} does not apply to schedule "
                            f"{r.schedule!r} (it ranks weights itself); leave it out")
    if r.optimizer not in OPTIMIZERS:
        raise PrunekitError(f"recipe key 'optimizer.name' = {r.optimizer!r} is not an optimizer; accepted: "
                            f"{', '.join(OPTIMIZERS)}")
    if r.lr_schedule not in LR_SCHEDULES:
        raise PrunekitError(f"recipe key 'optimizer.lr_schedule' = {r.lr_schedule!r} is not a schedule; accepted: "
                            f"{', '.join(LR_SCHEDULES)}")
    if not (_is_number(r.lr) and r.lr > 0):
        raise PrunekitError(f"recipe key 'optimizer.lr' = {r.lr!r} must be a positive number")
    for key, value in (("optimizer.momentum", r.momentum), ("optimizer.weight_decay", r.weight_decay)):
        if not (_is_number(value) and value >= 0):
            raise PrunekitError(f"recipe key '{key}' = {value!r} must be a non-negative number")
    if (r.epochs is None) == (r.steps is None):
        raise PrunekitError("recipe section 'training' needs exactly one of 'epochs' or 'steps' "
                            f"(got epochs={r.epochs!r}, steps={r.steps!r})")
    for key, value in (("training.epochs", r.epochs), ("training.steps", r.steps),
                       ("training.batch_size", r.batch_size), ("training.eval_every", r.eval_every)):
        if value is not None and not (_is_int(value) and value >= 1):
            raise PrunekitError(f"recipe key '{key}' = {value!r} must be a positive integer")
    if not (_is_int(r.pretrain_epochs) and r.pretrain_epochs >= 0):
        raise PrunekitError(f"recipe key 'training.pretrain_epochs' = {r.pretrain_epochs!r} must be a "
                            "non-negative integer")
    if r.pretrain_epochs and r.schedule not in _AFTER_TRAINING:
        raise PrunekitError(f"recipe key 'training.pretrain_epochs' = {r.pretrain_epochs} does not apply to schedule "
                            f"{r.schedule!r}; it applies to {', '.join(sorted(_AFTER_TRAINING))}")
    if r.schedule == "one-shot" and not r.pretrain_epochs:
        raise PrunekitError("schedule 'one-shot' prunes a trained model: set 'training.pretrain_epochs' to at least "
                            "1 (dense training before pruning; 'epochs' is then the fine-tuning)")
    _validate_schedule_args(r.schedule, r.schedule_args)


def _validate_schedule_args(schedule: str, args: dict) -> None:
    params = _schedule_parameters(schedule)
    for key, value in args.items():
        if key not in params:
            accepted = ", ".join(["pruner", *params])
            raise PrunekitError(f"unknown recipe key 'schedule.{key}' for schedule {schedule!r}; accepted: {accepted}")
        kinds = _annotated_kinds(params[key])
        if kinds and not any(_CHECKS[kind](value) for kind in kinds):
            raise PrunekitError(f"recipe key 'schedule.{key}' = {value!r} must be of type {' or '.join(kinds)}")


_CHECKS = {"int": _is_int, "float": _is_number, "str": lambda v: isinstance(v, str),
           "bool": lambda v: isinstance(v, bool), "None": lambda v: v is None}


def _annotated_kinds(param: inspect.Parameter) -> list[str]:
    """The simple types (int, float, str, bool, None) a pruner argument is annotated with; [] when it is richer."""
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        return []
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = [part.strip() for part in text.split("|")]
    return kinds if all(kind in _CHECKS for kind in kinds) else []


def _yaml_content(path: Path, text: str) -> Any:
    """Parse a YAML recipe, refusing aliases: `*ref` expands a shared node, and nested aliases grow exponentially
    ("billion laughs"), so a few hundred bytes could ask for gigabytes. A recipe has no use for them."""
    try:
        import yaml
    except ImportError as error:
        raise PrunekitError(f"recipe '{path}' is YAML but PyYAML is not installed; use a .toml recipe") from error
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise PrunekitError(f"recipe '{path}' uses the YAML alias *{event.anchor} (line {mark.line + 1}); "
                                    "aliases are not accepted in recipes: write the value out")
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PrunekitError(f"recipe '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    except RecursionError:
        raise PrunekitError(f"recipe '{path}' nests too deeply to be a recipe") from None


def _read(path: Path) -> dict:
    if not path.is_file():
        raise PrunekitError(f"recipe file '{path}' does not exist; pass a .toml (or .yaml) recipe")
    text = read_bounded_text(path, limit=RECIPE_LIMIT, what="recipe")
    if path.suffix in (".yaml", ".yml"):
        content = _yaml_content(path, text)
    elif path.suffix == ".toml":
        try:
            content = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise PrunekitError(f"recipe '{path}' is not valid TOML: {error}") from error
    else:
        raise PrunekitError(f"recipe '{path}' has suffix {path.suffix!r}; accepted: .toml, .yaml, .yml")
    if not isinstance(content, dict):
        raise PrunekitError(f"recipe '{path}' must be a table of sections, got {type(content).__name__}")
    return content


def recipe_from_dict(content: dict) -> Recipe:
    """A `Recipe` from the sectioned layout of a recipe file; every key is checked, unknown keys are refused."""
    for key in content:
        if key not in _TOP:
            raise PrunekitError(f"unknown recipe key {key!r}; accepted: {', '.join(_TOP)}")
    sections = {}
    for section in (*_SECTIONS, "schedule"):
        value = content.get(section, {})
        if not isinstance(value, dict):
            raise PrunekitError(f"recipe key {section!r} must be a section ([{section}]), got {value!r}")
        if section in _SECTIONS:
            for key in value:
                if key not in _SECTIONS[section]:
                    raise PrunekitError(f"unknown recipe key '{section}.{key}'; accepted: "
                                        f"{', '.join(_SECTIONS[section])}")
        sections[section] = dict(value)
    for section, key in (("model", "net"), ("data", "name"), ("schedule", "pruner")):
        if key not in sections[section]:
            raise PrunekitError(f"recipe needs '{section}.{key}'")
    schedule = sections["schedule"].pop("pruner")
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise PrunekitError(f"recipe key 'schedule.pruner' = {schedule!r} is not a schedule; accepted: "
                            f"{', '.join(SCHEDULES)}")
    budget, optimizer, training = sections["budget"], sections["optimizer"], sections["training"]
    kwargs = {
        "net": sections["model"]["net"], "data": sections["data"]["name"], "schedule": schedule,
        "schedule_args": sections["schedule"],
        "train_subset": sections["data"].get("train_subset"), "test_subset": sections["data"].get("test_subset"),
        "subset_seed": sections["data"].get("subset_seed"),
        **{k: v for k, v in budget.items()},
        **{("optimizer" if k == "name" else k): v for k, v in optimizer.items()},
        **training,
        **{k: content[k] for k in ("name", "seed", "out") if k in content},
    }
    for key in ("name", "out"):
        if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
            raise PrunekitError(f"recipe key {key!r} = {kwargs[key]!r} must be a string")
    return Recipe(**kwargs)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (.toml, or .yaml/.yml with PyYAML); PrunekitError names any bad key."""
    path = Path(path)
    recipe = recipe_from_dict(_read(path))
    if recipe.name is None:
        recipe = Recipe(**{**asdict(recipe), "name": path.stem})
    return recipe


@lru_cache(maxsize=4)
def _image_split(name: str, split: str) -> ImageSet:
    """`load_images`, cached: a benchmark runs many recipes on the same image set in one process."""
    return load_images(name, split)


def _subset(images: ImageSet, size: int | None, seed: int) -> ImageSet:
    if size is None or size == len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.subset(order[:size])


def recipe_data(recipe: Recipe) -> ClassificationData:
    """The recipe's training and test tensors (subsets drawn with `subset_seed`, default the recipe's seed)."""
    seed = recipe.seed if recipe.subset_seed is None else recipe.subset_seed
    train_set = _subset(_image_split(recipe.data, "train"), recipe.train_subset, seed)
    test_set = _subset(_image_split(recipe.data, "test"), recipe.test_subset, seed)
    data = ClassificationData.from_images(train_set, test_set)
    data.info["subset_seed"] = seed
    return data


def _phase_steps(recipe: Recipe, examples: int) -> int:
    return recipe.steps if recipe.steps is not None else recipe.epochs * math.ceil(examples / recipe.batch_size)


def resolved_schedule_args(recipe: Recipe, examples: int) -> dict:
    """The pruner's arguments: the recipe's, plus the budget, plus step values derived from the phase length."""
    steps = _phase_steps(recipe, examples)
    args = dict(recipe.schedule_args)
    _, sparsity_arg, takes_allocation = SCHEDULES[recipe.schedule]
    if sparsity_arg is not None:
        args[sparsity_arg] = recipe.sparsity
    if takes_allocation:
        default = inspect.signature(_pruner_class(recipe.schedule)).parameters["allocation"].default
        args["allocation"] = recipe.allocation or default
    if recipe.schedule in ("gradual-magnitude", "movement"):
        # movement scores are sums over training steps, so movement pruning waits 10% of the phase to collect them
        args.setdefault("start_step", 0 if recipe.schedule == "gradual-magnitude" else max(1, steps // 10))
        args.setdefault("end_step", max(1, (3 * steps) // 4))
        args.setdefault("frequency", max(1, (args["end_step"] - args["start_step"]) // 20))
    elif recipe.schedule in ("rigl", "set"):
        args.setdefault("end_step", max(1, (3 * steps) // 4))
        args.setdefault("update_frequency", max(1, args["end_step"] // 10))
        args.setdefault("seed", recipe.seed)
    elif recipe.schedule == "prune-at-init":
        args.setdefault("batches", 1)
    return args


def _init_batches(data: ClassificationData, count: int, batch_size: int, seed: int) -> list[tuple]:
    """`count` training batches for the scorers at initialization (SNIP, GraSP), drawn with `seed`."""
    order = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(seed))
    chunks = order[:count * batch_size].split(batch_size)
    return [(data.train_inputs[idx], data.train_labels[idx]) for idx in chunks]


def make_pruner(recipe: Recipe, model: nn.Module, data: ClassificationData,
                optimizer: torch.optim.Optimizer | None = None) -> tuple[Any, dict]:
    """The recipe's pruner built on `model` (None for 'dense'), and the arguments it was given (JSON-ready).

    `optimizer` goes to pruners that take one (RigL and SET zero its state on regrown connections)."""
    args = resolved_schedule_args(recipe, len(data.train_labels))
    cls = _pruner_class(recipe.schedule)
    if cls is None:
        return None, args
    call = dict(args)
    if optimizer is not None and "optimizer" in inspect.signature(cls).parameters:
        call["optimizer"] = optimizer
    if recipe.schedule == "prune-at-init":
        call["batches"] = _init_batches(data, args["batches"], recipe.batch_size, recipe.seed)
        call["input_shape"] = tuple(data.train_inputs.shape[1:])
        args["input_shape"] = list(call["input_shape"])
    return cls(model, **call), args


@dataclass(frozen=True)
class Pretrained:
    """The model state after a recipe's dense pre-training phase, reusable by recipes that differ only after it."""

    key: tuple
    state: dict
    phase: dict


def _pretrain_key(recipe: Recipe) -> tuple:
    """Everything the dense pre-training phase depends on: equal keys give bit-identical pre-trained models."""
    return (recipe.net, recipe.data, recipe.train_subset, recipe.test_subset, recipe.subset_seed, recipe.seed,
            recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay, recipe.lr_schedule,
            recipe.batch_size, recipe.pretrain_epochs, recipe.eval_every)


@dataclass
class RunResult:
    """What `execute` produced: the trained (finalized) model, the histories of every phase, IMP rounds, budget."""

    model: nn.Module
    phases: list[dict]
    rounds: list[dict]
    pruner_args: dict
    sparsity: dict
    test: dict
    pretrained: Pretrained | None = None

    @property
    def steps(self) -> int:
        return sum(p["steps"] for p in self.phases)

    @property
    def example_passes(self) -> int:
        return sum(p["example_passes"] for p in self.phases)


def _train_kwargs(recipe: Recipe, progress: bool) -> dict:
    return dict(batch_size=recipe.batch_size, optimizer=recipe.optimizer, lr=recipe.lr, momentum=recipe.momentum,
                weight_decay=recipe.weight_decay, lr_schedule=recipe.lr_schedule, seed=recipe.seed,
                eval_every=recipe.eval_every, progress=progress)


def _phase(name: str, history: TrainHistory, round_index: int | None = None) -> dict:
    phase = {"phase": name, **history.as_dict()}
    if round_index is not None:
        phase["round"] = round_index
    return phase


def execute(recipe: Recipe, data: ClassificationData | None = None, *, progress: bool = True,
            pretrained: Pretrained | None = None) -> RunResult:
    """Train as the recipe says, in this process, without writing anything; the model comes back finalized.

    Phases: optional dense pre-training (`pretrain_epochs`), then the pruned training (`epochs` or `steps`) with
    the pruner stepped after every optimizer step. Iterative magnitude pruning instead trains `rounds + 1` times:
    dense, then after each `next_round()` again from the rewound weights (weight rewinding resumes at
    `rewind_step`, as in Frankle et al. 2020; learning-rate rewinding retrains the whole schedule from the kept
    weights, as in Renda et al. 2020).

    `pretrained` (the `RunResult.pretrained` of an earlier run whose pre-training was the same) replaces running
    the pre-training phase again: the training is deterministic, so the result is the same, and the reused phase
    still counts in the budget. The benchmark prunes one pre-trained model to several sparsities this way.
    """
    data = recipe_data(recipe) if data is None else data
    if data.test_inputs is None:
        raise PrunekitError("recipe data has no test split; pass ClassificationData with test tensors")
    model = build_net(recipe.net, num_classes=NUM_CLASSES, seed=recipe.seed)
    budget = {"steps": recipe.steps} if recipe.steps is not None else {"epochs": recipe.epochs}
    kwargs = _train_kwargs(recipe, progress)
    phases, rounds = [], []
    if recipe.pretrain_epochs:
        if pretrained is not None and pretrained.key == _pretrain_key(recipe):
            model.load_state_dict(pretrained.state)
            phases.append({**pretrained.phase, "reused": True})
        elif pretrained is not None:
            raise PrunekitError("the pre-trained state comes from a recipe with a different pre-training; "
                                "pass the result of a recipe that differs only after pre-training")
        else:
            phases.append(_phase("pretrain", train(model, data, epochs=recipe.pretrain_epochs, **kwargs)))
        pretrained = Pretrained(_pretrain_key(recipe), copy.deepcopy(model.state_dict()), phases[-1])
    # IMP builds a fresh optimizer every round (inside `train`); the other schedules train once with this one
    optimizer = None if recipe.schedule == "iterative-magnitude" else make_optimizer(
        model, recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay)
    pruner, pruner_args = make_pruner(recipe, model, data, optimizer)
    if recipe.schedule == "iterative-magnitude":
        rewind_to = pruner.rewind_step if pruner.rewind == "weights" else 0
        for index in range(pruner.rounds + 1):
            if index:
                pruner.next_round()
            history = train(model, data, pruner=pruner, start_step=rewind_to if index else 0, **budget, **kwargs)
            phases.append(_phase("round", history, index))
            rounds.append({"round": index, "sparsity": float(pruner.sparsity()),
                           "test_accuracy": history.final["test_accuracy"], "test_loss": history.final["test_loss"],
                           "example_passes_so_far": sum(p["example_passes"] for p in phases)})
    else:
        kwargs["optimizer"] = optimizer
        phases.append(_phase("train", train(model, data, pruner=pruner, **budget, **kwargs)))
    if pruner is not None:
        sparsity = pruner.masks.sparsity()
        pruner.finalize()
    else:
        sparsity = {"achieved": 0.0, "numel": None, "layers": {}}
    weights = _prunable(model, sparsity)
    baked = sparsity_summary(weights)
    sparsity = {"target": recipe.sparsity, "achieved": sparsity["achieved"] if pruner else baked["overall"],
                "baked": baked["overall"], "numel": baked["numel"],
                "layers": {name: r["sparsity"] for name, r in baked["per_layer"].items()}}
    test = accuracy(model, data.test_inputs, data.test_labels)
    return RunResult(model, phases, rounds, pruner_args, sparsity, test, pretrained if recipe.pretrain_epochs else None)


def _prunable(model: nn.Module, sparsity: dict) -> dict[str, torch.Tensor]:
    from prunekit.targets import target_weights

    weights = target_weights(model)
    names = list(sparsity["layers"]) or list(weights)
    return {name: weights[name].detach() for name in names}


def _plot(result: RunResult, recipe: Recipe, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if result.rounds:
        xs = [r["sparsity"] for r in result.rounds]
        ys = [r["test_accuracy"] for r in result.rounds]
        ax.plot(xs, ys, marker="o", label="end of each round")
    else:
        rows = [row for phase in result.phases for row in phase["rows"]]
        xs = [row["sparsity"] or 0.0 for row in rows]
        ys = [row["test_accuracy"] for row in rows]
        ax.plot(xs, ys, marker="o", label="evaluations during training")
    ax.scatter([result.sparsity["achieved"]], [result.test["accuracy"]], color="red", zorder=3, label="final")
    ax.set_xlabel("achieved sparsity (fraction of prunable weights removed)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{recipe.name or recipe.schedule}: {recipe.net} on {recipe.data}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _record(recipe: Recipe, data: ClassificationData, result: RunResult, monitor: ResourceMonitor) -> dict:
    n_train = len(data.train_labels)
    calibration = None
    if recipe.schedule == "prune-at-init":
        calibration = {"source": recipe.data, "split": "train", "batches": result.pruner_args["batches"],
                       "batch_size": recipe.batch_size, "seed": recipe.seed}
    return result_record(
        model={"source": recipe.net, "num_classes": NUM_CLASSES, "init_seed": recipe.seed,
               "parameters": sum(p.numel() for p in result.model.parameters()),
               "weights_sha256": weights_sha256(result.model)},
        method={"name": recipe.schedule, "pruner": SCHEDULES[recipe.schedule][0], "arguments": result.pruner_args,
                "optimizer": {"name": recipe.optimizer, "lr": recipe.lr, "momentum": recipe.momentum,
                              "weight_decay": recipe.weight_decay, "lr_schedule": recipe.lr_schedule},
                "training": {"epochs": recipe.epochs, "steps": recipe.steps, "batch_size": recipe.batch_size,
                             "pretrain_epochs": recipe.pretrain_epochs},
                "seed": recipe.seed},
        calibration=calibration,
        evaluation={"source": recipe.data, "split": "test", "examples": len(data.test_labels),
                    "subset_seed": data.info.get("subset_seed")},
        metrics={"sparsity": result.sparsity, "test_accuracy": result.test["accuracy"],
                 "test_loss": result.test["loss"],
                 "budget": {"steps": result.steps, "example_passes": result.example_passes,
                            "epochs_equivalent": result.example_passes / n_train},
                 "rounds": result.rounds, "history": result.phases},
        resources={"train": monitor.as_dict()},
        extra={"data": {"source": recipe.data, "train_examples": n_train, "subset_seed": data.info.get("subset_seed")},
               "recipe": recipe.as_dict()},
    )


def run_recipe(recipe: Recipe, out: str | Path | None = None, *, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Run `recipe` and write, atomically, `out` (default: the recipe's `out`): `model.safetensors` (the final,
    finalized model), `prunekit.json` (the result record with the protocol card; also the checkpoint's manifest)
    and `accuracy_vs_sparsity.png`. An existing `out` is refused without `overwrite`. Returns the record."""
    out = out if out is not None else recipe.out
    if out is None:
        raise PrunekitError("the recipe has no 'out' directory; pass one (prunekit train RECIPE --out DIR)")
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        data = recipe_data(recipe)
        with ResourceMonitor() as monitor:
            result = execute(recipe, data, progress=progress)
        record = _record(recipe, data, result, monitor)
        record["checkpoint"] = {"file": CHECKPOINT, "net": recipe.net, "num_classes": NUM_CLASSES}
        save_file({k: v.detach().contiguous() for k, v in result.model.state_dict().items()}, tmp / CHECKPOINT,
                  metadata={"format": "pt", "net": recipe.net})
        _plot(result, recipe, tmp / PLOT)
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    record["output"] = str(out)
    return record


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """The model and record of a directory written by `run_recipe`; reads safetensors and JSON only."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise PrunekitError(f"'{path}' has no {MANIFEST}; pass a directory written by prunekit train")
    record = read_json_file(manifest, limit=MANIFEST_LIMIT, what="manifest")
    checkpoint = record.get("checkpoint")
    if not isinstance(checkpoint, dict) or not {"file", "net", "num_classes"} <= set(checkpoint):
        raise PrunekitError(f"'{manifest}' names no checkpoint; pass a directory written by prunekit train")
    weights = path / str(checkpoint["file"])
    if weights.resolve().parent != path.resolve() or not weights.is_file():
        raise PrunekitError(f"'{manifest}' names checkpoint '{checkpoint['file']}', which is not a file in '{path}'")
    check_safetensors(weights)
    model = build_net(checkpoint["net"], num_classes=checkpoint["num_classes"])
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as error:
        raise PrunekitError(f"checkpoint '{weights}' does not fit net {checkpoint['net']!r}: "
                            f"{str(error).splitlines()[0]}") from None
    return model, record

