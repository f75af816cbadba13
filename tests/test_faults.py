"""The fault suite: bad input and faults never destroy an input, never leave debris, and always say one line.

Run it alone with `pytest tests/test_faults.py`. Each case asserts the contract of the command line: exit code 2 for
bad input (1 for a fault of the machine, 130 for Ctrl-C), exactly one line on stderr naming the problem, no output
written, every input file unchanged. The kill tests interrupt a save at several points and assert that the output
either exists complete (its recorded weight hash matches its weights) or does not exist at all.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import prunekit
from prunekit.artifacts.files import check_distinct, clean_stale_siblings, temp_sibling
from prunekit.assets import model_path
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.measure.protocol import weights_sha256
from tiny_models import tiny_causal_lm

PRUNEKIT = [sys.executable, "-m", "prunekit.cli"]


def cli(args: list[str]) -> int:
    """The exit code of `prunekit ARGS`, whether main returns it or argparse exits with it."""
    try:
        return main(args)
    except SystemExit as exit_info:
        return exit_info.code


def one_line(capsys, *needles, prefix="prunekit: error: "):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(prefix), err
    for needle in needles:
        assert needle in err, err
    return err


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones too) with its bytes: what 'nothing written' is checked against."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def csv_input(tmp_path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"sentence number {i},{i % 2}\n" for i in range(20)))
    return path


@pytest.fixture
def tiny_dir(tmp_path, capsys) -> Path:
    """A tiny Llama saved as a Hugging Face directory (safetensors, no tokenizer)."""
    path = tmp_path / "tiny"
    tiny_causal_lm("llama", layers=2).save_pretrained(path)
    capsys.readouterr()  # the saver's progress bar is not the test's output
    return path


# 1. An output never overwrites an input, nor another output, whatever --overwrite says.


@pytest.mark.parametrize("flags", [["--out", "{input}"], ["--scores-out", "{input}"], ["--report", "{input}"],
                                   ["--out", "{link}"], ["--out", "{hardlink}"],
                                   ["--out", "{dir}/kept.csv", "--report", "{dir}/kept.csv"],
                                   ["--out", "{dir}/kept.csv", "--scores-out", "{dir}/kept.csv/x.parquet"]])
def test_data_output_colliding_with_input_or_output_is_refused(tmp_path, capsys, csv_input, flags):
    (tmp_path / "link.csv").symlink_to(csv_input)
    os.link(csv_input, tmp_path / "hard.csv")
    names = {"input": csv_input, "link": tmp_path / "link.csv", "hardlink": tmp_path / "hard.csv", "dir": tmp_path}
    args = [f.format(**names) for f in flags]
    before = tree(tmp_path)
    assert cli(["data", "--input", str(csv_input), "--method", "random", "--keep", "0.5", "--overwrite", *args]) == 2
    err = one_line(capsys)
    assert "collide" in err or "input" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flag, name", [("--report", "report"), ("--scores-out", "scores output"),
                                        ("--out", "output")])
def test_data_output_over_a_directory_is_refused_even_with_overwrite(tmp_path, capsys, csv_input, flag, name):
    """--overwrite replaces a file by a file; a directory there (with its files) stays."""
    target = tmp_path / ("kept.csv" if flag == "--out" else "out.parquet" if flag == "--scores-out" else "r.json")
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    before = tree(tmp_path)
    assert cli(["data", "--input", str(csv_input), "--method", "random", "--keep", "0.5", "--overwrite", flag,
                str(target)]) == 2
    one_line(capsys, f"{name} '{target}' is a directory")
    assert tree(tmp_path) == before


def test_work_directory_never_overwrites_the_input(tmp_path, capsys):
    features = tmp_path / "embeddings.npy"
    np.save(features, np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    before = tree(tmp_path)
    assert cli(["data", "--input", str(features), "--method", "prototypes", "--keep", "0.5", "--work-dir",
                str(tmp_path), "--out", str(tmp_path / "kept.npy")]) == 2
    one_line(capsys, "embeddings file", "is the input itself")
    assert tree(tmp_path) == before


def test_prune_output_over_its_input_model_is_refused(tmp_path, capsys, tiny_dir):
    before = tree(tmp_path)
    for out in (tiny_dir, tmp_path, tiny_dir / "sub"):
        assert cli(["prune", "--model", str(tiny_dir), "--out", str(out), "--overwrite", "--quiet"]) == 2
        one_line(capsys, "input model")
    assert tree(tmp_path) == before


def test_prune_output_over_its_calibration_file_is_refused(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("some text\n")
    assert cli(["prune", "--model", "smollm2-135m", "--calib", str(calib), "--out", str(tmp_path),
                 "--overwrite", "--quiet"]) == 2
    one_line(capsys, "calibration file")
    assert calib.read_text() == "some text\n"


def test_train_output_over_its_recipe_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nnet = "lenet-300-100"\n[data]\nname = "mnist"\n[schedule]\npruner = "dense"\n')
    assert cli(["train", str(recipe), "--out", str(tmp_path), "--overwrite"]) == 2
    one_line(capsys, "recipe")
    assert recipe.exists()


def test_check_distinct_accepts_separate_paths(tmp_path):
    check_distinct({"input": tmp_path / "a.csv", "none": None}, {"output": tmp_path / "b.csv",
                                                                 "report": tmp_path / "b.json"})


# 2. Parser bombs and oversized configuration files.


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nmodel: {net: *a9}\n")
    start = time.perf_counter()
    assert cli(["train", str(bomb), "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 1.0  # parsing events is linear in the file; nothing is expanded
    one_line(capsys, "alias", "not accepted")
    assert not (tmp_path / "out").exists()


def test_oversized_recipe_is_refused_before_reading(tmp_path, capsys):
    big = tmp_path / "big.toml"
    with big.open("wb") as f:
        f.truncate(2**20 + 1)  # sparse: costs no disk
    assert cli(["train", str(big), "--out", str(tmp_path / "out")]) == 2
    one_line(capsys, "at most")


# 3. Pickle never reaches an unpickler.


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_only_model_is_refused(tmp_path, capsys, tiny_dir, name):
    weights = tiny_dir / "model.safetensors"
    torch.save(load_file(weights), tiny_dir / name)
    weights.unlink()
    (tiny_dir / "prunekit.json").write_text("{}")
    assert cli(["prune", "--model", str(tiny_dir), "--sparsity", "0.5", "--no-eval", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    one_line(capsys, name, "pickle", "safetensors")
    with pytest.raises(PrunekitError, match="pickle"):
        prunekit.load(tiny_dir)
    assert not (tmp_path / "out").exists()


# 4. Sizes are validated before any work.


@pytest.mark.parametrize("flag, value, needle", [("--calib-seq-len", "100000", "exceeds the model's"),
                                                 ("--eval-seq-len", "100000", "exceeds the model's"),
                                                 ("--batch-size", "0", "below the minimum 1"),
                                                 ("--calib-samples", "0", "below the minimum 1"),
                                                 ("--threads", "0", "below the minimum 1")])
def test_sizes_are_validated_before_loading(tmp_path, capsys, flag, value, needle):
    start = time.perf_counter()
    assert cli(["prune", "--model", "smollm2-135m", "--sparsity", "0.5", flag, value, "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    one_line(capsys, needle)
    assert time.perf_counter() - start < 10  # no calibration text was tokenized, no model run
    assert not (tmp_path / "out").exists()


def test_python_api_refuses_bad_batch_size_and_length():
    model = tiny_causal_lm("gpt2")  # 64 positions
    with pytest.raises(PrunekitError, match="batch size 0"):
        prunekit.prune(model, None, method="magnitude", sparsity=0.5, batch_size=0)
    with pytest.raises(PrunekitError, match="exceeds the model's 64 positions"):
        prunekit.api.check_lengths(model, calibration_seq_len=65)


# 5. Corrupt or hostile weights are bad input, not internal errors.


def corrupt(weights: Path, kind: str) -> None:
    data = weights.read_bytes()
    if kind == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "absurd-header":
        weights.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif kind == "empty":
        weights.write_bytes(b"")
    elif kind == "binary":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "header-not-json":
        weights.write_bytes(struct.pack("<Q", 16) + b"\xff" * 16 + data[8:])


@pytest.mark.parametrize("kind", ["truncated", "absurd-header", "empty", "binary", "header-not-json"])
def test_corrupt_safetensors_is_bad_input(tmp_path, capsys, tiny_dir, kind):
    weights = tiny_dir / "model.safetensors"
    corrupt(weights, kind)
    assert cli(["prune", "--model", str(tiny_dir), "--sparsity", "0.5", "--no-eval", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    one_line(capsys, "model.safetensors")
    (tiny_dir / "prunekit.json").write_text("{}")
    with pytest.raises(PrunekitError, match="model.safetensors"):
        prunekit.load(tiny_dir)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe\x00", b"[1, 2]", b"[" * 100_000])
def test_broken_manifest_or_config_is_bad_input(tiny_dir, content):
    (tiny_dir / "prunekit.json").write_bytes(content)
    with pytest.raises(PrunekitError, match="prunekit.json"):
        prunekit.load(tiny_dir)
    (tiny_dir / "prunekit.json").write_text("{}")
    (tiny_dir / "config.json").write_bytes(content)
    with pytest.raises(PrunekitError, match="config.json"):
        prunekit.load(tiny_dir)


# 6. Every field the user names must exist.


@pytest.mark.parametrize("flag", ["--text-field", "--label-field", "--id-field", "--feature-field"])
def test_missing_field_is_refused_for_every_method(tmp_path, capsys, csv_input, flag):
    out = tmp_path / "kept.csv"
    assert cli(["data", "--input", str(csv_input), "--method", "random", "--keep", "0.5", flag, "body",
                 "--out", str(out)]) == 2
    one_line(capsys, "body")
    assert not out.exists()


# Every reader, fed truncated, empty, binary or oversized input.


def _binary(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(2048))


def _truncated(path: Path, content: bytes) -> None:
    path.write_bytes(content[: len(content) // 2 + 1])


def _npy_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.arange(64, dtype=np.float32).reshape(16, 4))
    return buffer.getvalue()


def _npy_oversized(path: Path) -> None:
    data = bytearray(_npy_bytes())
    header_end = data.index(b"\n") + 1
    header = data[10:header_end].decode("latin1").replace("(16, 4)", "(10000000000, 4)")
    path.write_bytes(bytes(data[:10]) + header.encode("latin1") + bytes(data[header_end:]))


def _parquet_bytes() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(50)]}), buffer)
    return buffer.getvalue()


READER_CASES = {
    "jsonl-truncated": ("x.jsonl", lambda p: p.write_text('{"text": "a"}\n{"text": "b')),
    "jsonl-empty": ("x.jsonl", lambda p: p.write_text("")),
    "jsonl-binary": ("x.jsonl", _binary),
    "json-truncated": ("x.json", lambda p: p.write_text('[{"text": "a"}, {"te')),
    "json-deep": ("x.json", lambda p: p.write_text("[" * 100_000)),
    "csv-empty": ("x.csv", lambda p: p.write_text("")),
    "csv-binary": ("x.csv", _binary),
    "csv-ragged": ("x.csv", lambda p: p.write_text("text,label\na,1\nb,2,3,4\n")),
    "parquet-truncated": ("x.parquet", lambda p: _truncated(p, _parquet_bytes())),
    "parquet-empty": ("x.parquet", lambda p: p.write_bytes(b"")),
    "parquet-binary": ("x.parquet", _binary),
    "npy-truncated": ("x.npy", lambda p: _truncated(p, _npy_bytes())),
    "npy-empty": ("x.npy", lambda p: p.write_bytes(b"")),
    "npy-binary": ("x.npy", _binary),
    "npy-oversized": ("x.npy", _npy_oversized),
    "npz-binary": ("x.npz", _binary),
    "txt-binary": ("x.txt", _binary),
}


@pytest.mark.parametrize("case", list(READER_CASES))
def test_every_data_reader_refuses_broken_input(tmp_path, capsys, case):
    name, make = READER_CASES[case]
    path = tmp_path / name
    make(path)
    before = tree(tmp_path)
    out = tmp_path / ("kept" + path.suffix)
    assert cli(["data", "--input", str(path), "--method", "random", "--keep", "0.5", "--out", str(out),
                 "--report", str(tmp_path / "r.json")]) == 2
    one_line(capsys)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("suffix, make", [(".toml", lambda p: p.write_text("[model\nnet = ")),
                                          (".toml", lambda p: p.write_bytes(b"")),
                                          (".toml", _binary),
                                          (".yaml", lambda p: p.write_text("model: {net: [")),
                                          (".yaml", _binary),
                                          (".yaml", lambda p: p.write_text("[" * 10_000))])
def test_recipe_readers_refuse_broken_input(tmp_path, capsys, suffix, make):
    recipe = tmp_path / f"r{suffix}"
    make(recipe)
    assert cli(["train", str(recipe), "--out", str(tmp_path / "out")]) == 2
    one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_training_checkpoint_reader_refuses_corrupt_weights(tmp_path):
    from prunekit.training import load_checkpoint

    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4)
    (tmp_path / "prunekit.json").write_text(json.dumps(
        {"checkpoint": {"file": "model.safetensors", "net": "lenet-300-100", "num_classes": 10}}))
    with pytest.raises(PrunekitError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "prunekit.json").write_text(json.dumps(
        {"checkpoint": {"file": "../elsewhere.safetensors", "net": "lenet-300-100", "num_classes": 10}}))
    with pytest.raises(PrunekitError, match="not a file in"):
        load_checkpoint(tmp_path)


# 7. Faults of the machine, kills and Ctrl-C.


def test_full_disk_during_save_is_an_environment_error(tmp_path, capsys, monkeypatch, csv_input):
    import errno

    from prunekit.data import api as data_api

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".kept.tmp"))

    monkeypatch.setattr(data_api, "write_table", full)
    before = tree(tmp_path)
    assert cli(["data", "--input", str(csv_input), "--method", "random", "--keep", "0.5", "--out",
                 str(tmp_path / "kept.csv")]) == 1
    err = one_line(capsys, "no space left", "nothing was written")
    assert "internal error" not in err
    assert tree(tmp_path) == before


def test_stale_temporaries_of_a_killed_process_are_cleaned(tmp_path):
    out = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".model.tmp-{pid}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = temp_sibling(out, "tmp")  # this process is alive: its temporary must survive
    live.mkdir()
    other = tmp_path / f".other.tmp-{pid}-0123abcd"
    other.mkdir()
    assert clean_stale_siblings(out) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_killed_overwrite_restores_the_previous_output(tmp_path):
    out = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".model.old-{int(dead.stdout)}-0123abcd"
    old.mkdir()
    (old / "prunekit.json").write_text("{}")
    clean_stale_siblings(out)
    assert (out / "prunekit.json").read_text() == "{}" and not old.exists()


SAVE_SCRIPT = """
import sys, torch
import prunekit
from prunekit.assets import model_path
from prunekit.measure.protocol import weights_sha256
sys.path.insert(0, {tests!r})
from tiny_models import tiny_causal_lm
model = tiny_causal_lm("llama", layers=12, vocab=20000)  # ~10 MB to write
print("ready", flush=True)
prunekit.save(model, None, {out!r}, {{"weights_sha256": weights_sha256(model)}}, overwrite=True)
print("saved", flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_a_save_killed_at_any_point_leaves_all_or_nothing(tmp_path, delay):
    out = tmp_path / "model"
    script = SAVE_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if out.exists():
        model, _, record = prunekit.load(out)
        assert weights_sha256(model) == record["weights_sha256"]
    # The next save beside it cleans up what the killed one left.
    prunekit.save(tiny_causal_lm("llama", layers=1), None, out, {}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    # A runner that starts the tests in the background (CI does) passes SIGINT ignored on to its children, and Python
    # keeps an ignored SIGINT ignored: give the child the terminal's default, as a user's shell would.
    process = subprocess.Popen([*PRUNEKIT, "prune", "--model", "smollm2-135m", "--sparsity", "0.5", "--out",
                                str(tmp_path / "out")], stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # say where it hangs: faulthandler prints every thread's stack on SIGABRT
        process.send_signal(signal.SIGABRT)
        _, err = process.communicate()
        pytest.fail(f"no exit 60 s after Ctrl-C; stacks:\n{err[-6000:]}")
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "prunekit: interrupted; nothing was written"
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


# 8. A non-numeric option value is one line, not the usage text.


@pytest.mark.parametrize("args", [["prune", "--model", "m", "--out", "o", "--batch-size", "many"],
                                  ["prune", "--model", "m", "--out", "o", "--sparsity", "half"],
                                  ["data", "--input", "x", "--method", "random", "--keep", "most"],
                                  ["train", "r.toml", "--threads", "two"],
                                  ["prune", "--model", "m"]])
def test_bad_option_value_is_one_line(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    one_line(capsys, "argument" if len(args) > 3 else "required")


def test_safetensors_checker_accepts_real_files(tmp_path):
    from prunekit.artifacts.files import check_safetensors

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2)}, path)
    check_safetensors(path)


def test_full_disk_for_real_on_a_small_tmpfs(tmp_path, capsys):
    """A real ENOSPC: a 1 MiB tmpfs that the saved model does not fit on (needs root; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        model = tiny_causal_lm("llama", layers=4, vocab=8000)  # ~5 MB of safetensors
        with pytest.raises(Exception) as info:
            prunekit.save(model, None, mount / "out", {})
        assert "No space left on device" in str(info.value) or getattr(info.value, "errno", None) == 28
        assert sorted(os.listdir(mount)) == []  # the temporary directory is gone too
        source = tmp_path / "source"
        model.save_pretrained(source)
        for tokenizer_file in model_path("smollm2-135m").glob("tokenizer*"):  # any tokenizer: magnitude needs none
            shutil.copy(tokenizer_file, source)
        capsys.readouterr()
        assert cli(["prune", "--model", str(source), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
                    "--out", str(mount / "out"), "--quiet"]) == 1
        err = one_line(capsys, "no space left on the device", str(mount / "out"), "nothing was written")
        assert "internal error" not in err
        assert sorted(os.listdir(mount)) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)
