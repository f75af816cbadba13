"""The training loop, recipe validation, and `prunekit train` end to end on a tiny MNIST recipe."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.measure import weights_sha256
from prunekit.training.loop import ClassificationData, learning_rate, train
from prunekit.training.recipes import (
    CHECKPOINT,
    PLOT,
    execute,
    load_checkpoint,
    load_recipe,
    recipe_data,
    recipe_from_dict,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "recipes"

TINY = """
seed = 0

[model]
net = "lenet-300-100"

[data]
name = "mnist"
train_subset = 512
test_subset = 1000

[schedule]
pruner = "gradual-magnitude"

[budget]
sparsity = 0.8

[training]
epochs = 1
batch_size = 64
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_data(n: int = 40, seed: int = 0) -> ClassificationData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return ClassificationData(x, y, x[:10], y[:10])


class InputRecorder(nn.Module):
    """A linear classifier that remembers the sum of every training batch it sees (a fingerprint of the batch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 2)
        self.seen: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(round(float(x.sum()), 5))
        return self.fc(x)


class CountingPruner:
    """Checks the loop's contract: step() comes after optimizer.step(), with this step's gradients still present."""

    def __init__(self, model: nn.Module):
        self.model, self.steps, self.before = model, 0, model.fc.weight.detach().clone()

    def step(self) -> None:
        assert self.model.fc.weight.grad is not None
        assert not torch.equal(self.model.fc.weight, self.before)  # the optimizer has already moved the weight
        self.before = self.model.fc.weight.detach().clone()
        self.steps += 1

    def sparsity(self) -> float:
        return 0.25

    def target_sparsity(self, step: int) -> float:
        return step / 100


# ---- the loop ----

def test_learning_rate_schedules():
    assert learning_rate("constant", 0.1, 7, 10) == 0.1
    assert learning_rate("cosine", 0.1, 0, 10) == pytest.approx(0.1)
    assert learning_rate("cosine", 0.1, 5, 10) == pytest.approx(0.05)
    assert [learning_rate("step", 1.0, s, 8) for s in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(PrunekitError, match="lr_schedule 'linear'"):
        learning_rate("linear", 0.1, 0, 10)


def test_train_steps_pruner_after_every_optimizer_step_and_records_history():
    model = InputRecorder()
    pruner = CountingPruner(model)
    calls = []
    history = train(model, _tiny_data(), epochs=3, batch_size=16, pruner=pruner,
                    on_step=lambda step, loss: calls.append(step), progress=False)
    assert pruner.steps == history.steps == 9 == len(calls)  # 40 examples in batches of 16: 3 steps per epoch
    assert calls == list(range(9))
    assert history.example_passes == 120
    assert [row["step"] for row in history.rows] == [3, 6, 9]  # one evaluation per epoch
    assert history.final["sparsity"] == 0.25 and history.final["target_sparsity"] == 0.09
    assert 0.0 <= history.final["test_accuracy"] <= 1.0


def test_train_is_deterministic_and_resumes_with_the_same_batches():
    torch.manual_seed(0)
    a, b = InputRecorder(), InputRecorder()
    b.load_state_dict(a.state_dict())
    train(a, _tiny_data(), steps=10, batch_size=16, seed=3, progress=False)
    train(b, _tiny_data(), steps=10, batch_size=16, seed=3, progress=False)
    assert a.seen == b.seen and torch.equal(a.fc.weight, b.fc.weight)
    resumed = InputRecorder()
    history = train(resumed, _tiny_data(), steps=10, batch_size=16, seed=3, start_step=4, progress=False)
    assert resumed.seen == a.seen[4:] and history.steps == 6
    other = InputRecorder()
    train(other, _tiny_data(), steps=10, batch_size=16, seed=4, progress=False)
    assert other.seen != a.seen


@pytest.mark.parametrize("options, message", [
    (dict(epochs=1, steps=3), "exactly one of epochs or steps"),
    (dict(epochs=0), "epochs=0"),
    (dict(epochs=1, optimizer="rmsprop"), "optimizer 'rmsprop'"),
    (dict(epochs=1, lr=-1.0), "lr=-1.0"),
    (dict(steps=3, start_step=3), "start_step=3"),
])
def test_train_rejects_bad_options(options, message):
    with pytest.raises(PrunekitError, match=message):
        train(InputRecorder(), _tiny_data(), progress=False, **options)


# ---- recipes ----

def _tiny_recipe(**changes) -> dict:
    import tomllib

    content = tomllib.loads(TINY)
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (content.setdefault(section, {}) if section else content)[field] = value
    return content


@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, "unknown recipe key 'colour'"),
    ({"budget.target": 0.5}, "unknown recipe key 'budget.target'; accepted: sparsity, allocation"),
    ({"schedule.warmup": 3}, "unknown recipe key 'schedule.warmup' for schedule 'gradual-magnitude'"),
    ({"budget.sparsity": 1.0}, r"'budget.sparsity' = 1.0 must be a fraction removed in \[0, 1\)"),
    ({"budget.sparsity": "0.5"}, "'budget.sparsity' = '0.5'"),
    ({"budget.allocation": "outliers"}, "'budget.allocation' = 'outliers' is not an allocation; accepted: uniform"),
    ({"schedule.pruner": "obs"}, "'schedule.pruner' = 'obs' is not a schedule; accepted: dense, one-shot"),
    ({"schedule.frequency": 2.5}, "'schedule.frequency' = 2.5 must be of type int"),
    ({"model.net": "vgg16"}, "'model.net' = 'vgg16' is not a network"),
    ({"data.name": "cifar10"}, "'data.name' = 'cifar10' is not an image set"),
    ({"data.train_subset": 0}, r"'data.train_subset' = 0 must be an integer in \[1, 60000\]"),
    ({"training.steps": 5}, "exactly one of 'epochs' or 'steps'"),
    ({"optimizer.name": "lion"}, "'optimizer.name' = 'lion' is not an optimizer"),
    ({"schedule.pruner": "one-shot"}, "set 'training.pretrain_epochs'"),
    ({"schedule.pruner": "rigl", "training.pretrain_epochs": 1}, "'training.pretrain_epochs' = 1 does not apply"),
])
def test_recipe_validation_names_the_bad_key(changes, message):
    with pytest.raises(PrunekitError, match=message):
        recipe_from_dict(_tiny_recipe(**changes))


def test_example_recipes_load_and_yaml_matches_toml(tmp_path):
    names = sorted(p.name for p in EXAMPLES.iterdir())
    assert {"lenet_mnist_gmp.toml", "resnet_fmnist_imp.toml"} <= set(names)
    for path in EXAMPLES.iterdir():
        recipe = load_recipe(path)
        assert recipe.name == path.stem and recipe.out
    yaml = pytest.importorskip("yaml")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(_tiny_recipe()))
    (tmp_path / "tiny.toml").write_text(TINY)
    assert load_recipe(tmp_path / "tiny.yaml") == load_recipe(tmp_path / "tiny.toml")
    assert recipe_from_dict(load_recipe(tmp_path / "tiny.toml").as_dict()) == load_recipe(tmp_path / "tiny.toml")


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("prunekit: error: ")
    return err


@pytest.mark.parametrize("old, new, message", [
    ("seed = 0", 'seed = 0\ncolour = "red"', "unknown recipe key 'colour'"),
    ("sparsity = 0.8", "sparsity = 1.5", "'budget.sparsity' = 1.5"),
    ('pruner = "gradual-magnitude"', 'pruner = "lottery"', "'schedule.pruner' = 'lottery'"),
])
def test_cli_bad_recipe_exits_2_and_writes_nothing(tmp_path, capsys, old, new, message):
    recipe_path = tmp_path / "bad.toml"
    recipe_path.write_text(TINY.replace(old, new))
    err = _cli_error(capsys, ["train", str(recipe_path), "--out", str(tmp_path / "out"), "--quiet"])
    assert message in err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.toml"]


def test_cli_missing_recipe_exits_2(tmp_path, capsys):
    err = _cli_error(capsys, ["train", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "out")])
    assert "recipe file" in err and "does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_tiny_recipe_end_to_end(tmp_path, capsys):
    recipe_path = tmp_path / "tiny.toml"
    recipe_path.write_text(TINY)
    out = tmp_path / "run"
    assert main(["train", str(recipe_path), "--out", str(out), "--quiet", "--threads", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKPOINT, PLOT, "prunekit.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.toml"]  # no temporary directory left
    assert json.loads((out / "prunekit.json").read_text())["metrics"] == record["metrics"]

    sparsity = record["metrics"]["sparsity"]
    layers = len(sparsity["layers"])
    assert sparsity["target"] == 0.8
    assert abs(sparsity["achieved"] - 0.8) * sparsity["numel"] <= layers  # exact to one weight per layer
    assert sparsity["baked"] == sparsity["achieved"]
    budget = record["metrics"]["budget"]
    assert budget["steps"] == 8 and budget["example_passes"] == 512  # 512 examples, batches of 64, one epoch
    assert record["method"]["arguments"] == {"final_sparsity": 0.8, "allocation": "global", "start_step": 0,
                                             "end_step": 6, "frequency": 1}
    assert record["environment"]["torch_threads"] == 1 and record["resources"]["train"]["wall_s"] > 0

    # the safetensors checkpoint reloads to the same weights and the same outputs as a fresh run of the recipe
    model, manifest = load_checkpoint(out)
    assert weights_sha256(model) == record["model"]["weights_sha256"] == manifest["model"]["weights_sha256"]
    recipe = load_recipe(recipe_path)
    rerun = execute(recipe, progress=False)
    data = recipe_data(recipe)
    model.eval()
    rerun.model.eval()
    with torch.no_grad():
        assert torch.equal(model(data.test_inputs), rerun.model(data.test_inputs))
    assert rerun.test["accuracy"] == record["metrics"]["test_accuracy"]

    # the same output again is refused without --overwrite, and nothing changes
    before = (out / "prunekit.json").read_text()
    err = _cli_error(capsys, ["train", str(recipe_path), "--out", str(out), "--quiet"])
    assert "exists; pass --overwrite" in err
    assert (out / "prunekit.json").read_text() == before


def test_iterative_magnitude_recipe_runs_its_rounds():
    content = _tiny_recipe(**{"schedule.pruner": "iterative-magnitude", "schedule.rounds": 2,
                              "schedule.rewind_step": 2, "budget.sparsity": 0.75})
    recipe = recipe_from_dict(content)
    result = execute(recipe, progress=False)
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert [r["sparsity"] for r in result.rounds] == pytest.approx([0.0, 0.5, 0.75], abs=1e-5)
    # rounds 1 and 2 resume at the rewind step: 8 + 6 + 6 steps, every one counted in the budget
    assert [p["steps"] for p in result.phases] == [8, 6, 6] and result.steps == 20
    assert result.example_passes == 512 + 2 * (512 - 2 * 64)
    assert math.isclose(result.sparsity["achieved"], 0.75, abs_tol=3 / result.sparsity["numel"])


def test_replace_revalidates():
    recipe = recipe_from_dict(_tiny_recipe())
    assert replace(recipe, seed=3).seed == 3
    with pytest.raises(PrunekitError, match="budget.sparsity"):
        replace(recipe, sparsity=-0.1)


@pytest.mark.parametrize("changes, allocation", [
    ({"schedule.pruner": "dense", "budget.sparsity": 0.0}, None),
    ({"schedule.pruner": "one-shot", "training.pretrain_epochs": 1}, "global"),
    ({"schedule.pruner": "prune-at-init", "schedule.scorer": "snip"}, "global"),
    ({"schedule.pruner": "prune-at-init", "schedule.scorer": "grasp", "budget.allocation": "uniform"}, "uniform"),
    ({"schedule.pruner": "prune-at-init", "schedule.scorer": "synflow", "schedule.rounds": 5}, "global"),
    ({"schedule.pruner": "movement", "training.pretrain_epochs": 1}, None),
    ({"schedule.pruner": "rigl"}, "erk"),  # the pruner's own default allocation when the recipe gives none
    ({"schedule.pruner": "set", "budget.allocation": "uniform"}, "uniform"),
])
def test_every_schedule_reaches_its_budget(changes, allocation):
    recipe = recipe_from_dict(_tiny_recipe(**changes))
    result = execute(recipe, progress=False)
    sparsity = result.sparsity
    assert abs(sparsity["achieved"] - recipe.sparsity) * sparsity["numel"] <= len(sparsity["layers"])
    assert sparsity["baked"] >= sparsity["achieved"]  # finalize baked every masked zero into the weights
    assert result.pruner_args.get("allocation") == allocation
    assert result.example_passes == 512 * (1 + recipe.pretrain_epochs)


def test_reused_pretraining_equals_running_it_again():
    recipe = recipe_from_dict(_tiny_recipe(**{"schedule.pruner": "one-shot", "training.pretrain_epochs": 1,
                                              "budget.sparsity": 0.5}))
    first = execute(recipe, progress=False)
    again = execute(replace(recipe, sparsity=0.9), progress=False)
    reused = execute(replace(recipe, sparsity=0.9), progress=False, pretrained=first.pretrained)
    assert weights_sha256(reused.model) == weights_sha256(again.model)
    assert reused.example_passes == again.example_passes == 1024
    with pytest.raises(PrunekitError, match="different pre-training"):
        execute(replace(recipe, seed=1), progress=False, pretrained=first.pretrained)
