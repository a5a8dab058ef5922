"""The export's artifacts read with plain zarr, h5py and open_clip only: this module imports
nothing from ecvl or pipeline; the stages run as the `ecvl` command in a subprocess."""

import io
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
import zarr

from support import write_params


@pytest.mark.slow
def test_export_outputs_read_with_plain_libraries(tmp_path):
    params = write_params(tmp_path, stage1={"epochs": 1, "batch_size": 32})
    ecvl = Path(sys.executable).parent / "ecvl"
    for stage in ("shard", "stage1", "export"):
        run = subprocess.run(
            [str(ecvl), stage, "--params", str(params)], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]

    root = zarr.open_group(str(tmp_path / "data/embeddings.zarr"), mode="r")
    meta = yaml.safe_load((tmp_path / "data/shards/meta.json").read_text())
    for split in ("train", "val", "test"):
        feats = root[f"{split}/features"]
        assert feats.shape == (meta["splits"][split]["count"], root.attrs["embed_dim"])
        assert feats.dtype == np.float16
        assert (
            np.bincount(root[f"{split}/labels"][:], minlength=10).tolist()
            == (meta["splits"][split]["per_class"])
        )
    text = root["text/features"][:]
    assert text.shape == (10, root.attrs["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)

    with h5py.File(tmp_path / "data/train_images.h5", "r") as f:
        keys = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][:]]
        assert keys == [str(k) for k in root["train/keys"][:]]
        assert f["labels"][:].tolist() == root["train/labels"][:].tolist()
        # the digits are raw pixels in the shards (`shard.encoding: auto`), so in the store too:
        # plain numpy reads them, without pickles
        assert f["ext"][0] in (b"npy", "npy")
        pixels = np.load(io.BytesIO(f["images"][0].tobytes()), allow_pickle=False)
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
