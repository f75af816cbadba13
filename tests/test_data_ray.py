import importlib.util
import json

import numpy as np
import pyarrow.parquet
import pytest

from prunekit.data.api import prune_data

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed"),
              pytest.mark.usefixtures("one_thread")]

TEXTS = [
    "Shares rose after the company reported record profits.",
    "The goalkeeper saved a penalty in the last minute.",
    "The new laptop has a faster processor and a brighter screen.",
    "Voters go to the polls on Thursday.",
    "The band announced a world tour.",
    "Shares rose after the company reported record profits.",
    "A storm closed schools across the region.",
    "The museum opened an exhibition of modern sculpture.",
    "The minister resigned over the scandal.",
    "Engineers tested a prototype electric aircraft.",
    "The tennis final went to five sets.",
    "Inflation fell for the third month in a row.",
]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from prunekit.data.distributed import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_ray_path_writes_the_same_ids_scores_and_kept_subset_as_local(local_ray, tmp_path):
    """Embeddings from 2 Ray actors (one per CPU), back in input order, give the local path's outputs."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    tables = {}
    for backend in ("local", "ray"):
        prune_data(path, method="prototypes", keep=0.5, clusters=2, backend=backend, out=tmp_path / f"{backend}.jsonl",
                   scores_out=tmp_path / f"{backend}.parquet", progress=False, threads=1)
        tables[backend] = pyarrow.parquet.read_table(tmp_path / f"{backend}.parquet").to_pydict()
    local, remote = tables["local"], tables["ray"]
    assert local["id"] == remote["id"] == [f"t{i}" for i in range(12)]
    assert local["index"] == remote["index"] and local["keep"] == remote["keep"] and sum(local["keep"]) == 6
    np.testing.assert_allclose(local["score"], remote["score"], atol=1e-5)
    assert (tmp_path / "local.jsonl").read_text() == (tmp_path / "ray.jsonl").read_text()
