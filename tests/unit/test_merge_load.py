"""merge._load_shard (arrays as views of the mmapped pickle) must give exactly what paddle.load gives."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from bi150_ray.checkpoint import merge


def test_mapped_load_matches_paddle_load(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "a.weight": paddle.to_tensor(rng.standard_normal((300, 70)).astype(np.float32)),
        "b.weight": paddle.to_tensor(rng.standard_normal((5, 9)).astype(np.float32)).astype("bfloat16"),
        "c.weight": paddle.to_tensor(rng.standard_normal(40000).astype(np.float16)),
        "d.step": paddle.to_tensor(np.array([7], dtype=np.int64)),
    }
    path = str(tmp_path / "model_state.pdparams")
    paddle.save(state, path)
    want = paddle.load(path, return_numpy=True)
    want.pop("StructuredToParameterName@@", None)
    got = merge._load_shard(path)
    assert list(got) == list(want)
    for key, value in want.items():
        assert type(got[key]) is np.ndarray, key
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


def test_mapped_load_rejects_non_state_dicts(tmp_path):
    empty = tmp_path / "empty.pdparams"
    empty.write_bytes(b"")
    with pytest.raises(merge.MergeError, match="empty.pdparams: cannot be read"):
        merge._load_shard(str(empty))
    listed = tmp_path / "list.pdparams"
    paddle.save([paddle.to_tensor(np.zeros(3, np.float32))], str(listed))
    with pytest.raises(merge.MergeError, match="list.pdparams: does not hold a non-empty state dict"):
        merge._load_shard(str(listed))


def test_a_shard_that_names_any_other_callable_is_refused_without_running_it(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "model_state.pdparams"
    bad.write_bytes(pickle.dumps({"a.weight": np.zeros(3, np.float32), "b": Exploit()}, protocol=4))
    with pytest.raises(merge.MergeError, match=r"model_state.pdparams: .*refusing (io|builtins)\.open"):
        merge._load_shard(str(bad))
    assert not marker.exists()
