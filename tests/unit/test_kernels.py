"""bi150_ray.data.kernels: the compiled Fisher-Yates must permute exactly as RandomState.shuffle
and leave the generator where NumPy leaves it (every later draw of the plan depends on it); the
compiled sample_idx walk is checked against PaddleNLP's C++ helper in test_samples.py."""

from __future__ import annotations

import numpy as np
import pytest

from bi150_ray.data import kernels
from bi150_ray.data.kernels import shuffle


@pytest.fixture(autouse=True)
def compiled_for_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The build hands small arrays to NumPy (faster there); here the C code gets every size."""
    monkeypatch.setattr(kernels, "COMPILED_MIN_ITEMS", 0)


def test_the_extension_was_built() -> None:
    # `pip install -e .` builds it wherever a C compiler is (CI, the demo venv); without it every
    # test below would pass through NumPy's fallback and prove nothing about the compiled code.
    assert kernels.COMPILED, "bi150_ray.data._kernels is missing: reinstall with a C compiler present"


# Sizes around the generator's 624-word refills and the power-of-two mask boundaries.
SIZES = [0, 1, 2, 3, 5, 16, 17, 33, 623, 624, 625, 1025, 4097, 100_003]


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64])
@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 - 1])
def test_same_permutation_and_generator_state(dtype, seed: int) -> None:
    theirs_rng, ours_rng = np.random.RandomState(seed), np.random.RandomState(seed)
    for n in SIZES:  # one generator through all sizes: every call starts mid-stream
        theirs = np.arange(n, dtype=dtype)
        ours = theirs.copy()
        theirs_rng.shuffle(theirs)
        shuffle(ours_rng, ours)
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == theirs.dtype
    a, b = theirs_rng.get_state(), ours_rng.get_state()
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:] == b[2:]
    assert theirs_rng.randint(0, 2**31, size=8).tolist() == ours_rng.randint(0, 2**31, size=8).tolist()


def test_values_not_just_positions() -> None:
    # Repeated and arbitrary values (a doc_idx holds every document once per epoch).
    values = np.tile(np.random.RandomState(7).randint(-5, 10**9, size=3001), 3).astype(np.int64)
    theirs, ours = values.copy(), values.copy()
    np.random.RandomState(9).shuffle(theirs)
    shuffle(np.random.RandomState(9), ours)
    np.testing.assert_array_equal(ours, theirs)


def test_views_and_the_gaussian_cache_survive() -> None:
    rng_a, rng_b = np.random.RandomState(5), np.random.RandomState(5)
    rng_a.standard_normal(), rng_b.standard_normal()  # leaves a cached gaussian in the state
    a = np.arange(10_000, dtype=np.int64)
    b = a.copy()
    rng_a.shuffle(a[:6000])  # contiguous slices, the way doc_idx's last epoch is shuffled apart
    rng_a.shuffle(a[6000:])
    shuffle(rng_b, b[:6000])
    shuffle(rng_b, b[6000:])
    np.testing.assert_array_equal(a, b)
    assert rng_a.standard_normal() == rng_b.standard_normal()


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(3000, dtype=np.int64)[::2],  # strided
        lambda: np.arange(3000, dtype=np.int16),  # item size NumPy handles, the C code does not
        lambda: np.arange(3000, dtype=np.float64),
        lambda: np.arange(3000, dtype=np.int64).reshape(1000, 3),  # shuffles rows
    ],
    ids=["strided", "int16", "float64", "2-d"],
)
def test_other_arrays_fall_back_to_numpy(make) -> None:
    theirs, ours = make(), make()
    np.random.RandomState(3).shuffle(theirs)
    shuffle(np.random.RandomState(3), ours)
    np.testing.assert_array_equal(ours, theirs)


def test_a_randomstate_on_another_bit_generator() -> None:
    theirs, ours = np.arange(50_000, dtype=np.int64), np.arange(50_000, dtype=np.int64)
    np.random.RandomState(np.random.PCG64(4)).shuffle(theirs)
    shuffle(np.random.RandomState(np.random.PCG64(4)), ours)
    np.testing.assert_array_equal(ours, theirs)


def test_numpy_path_on_request() -> None:
    theirs, ours = np.arange(5000, dtype=np.int64), np.arange(5000, dtype=np.int64)
    np.random.RandomState(1).shuffle(theirs)
    shuffle(np.random.RandomState(1), ours, compiled=False)
    np.testing.assert_array_equal(ours, theirs)


def test_the_extension_refuses_bad_state() -> None:
    key = np.zeros(624, dtype=np.uint32)
    data = np.arange(10, dtype=np.int64)
    with pytest.raises(ValueError, match="position"):
        kernels._kernels.shuffle(data, 8, key, 625)
    with pytest.raises(ValueError, match="624"):
        kernels._kernels.shuffle(data, 8, key[:10], 0)
    with pytest.raises(ValueError, match="item size"):
        kernels._kernels.shuffle(data, 2, key, 0)


def test_sample_starts_refuses_what_it_cannot_walk() -> None:
    out = np.zeros((4, 2), dtype=np.int32)
    sizes = np.array([5, 5], dtype=np.int32)
    with pytest.raises(ValueError, match="outside sizes"):
        kernels.sample_starts(sizes, np.array([0, 2], dtype=np.int64), 3, out)
    with pytest.raises(ValueError, match="int32"):
        kernels.sample_starts(sizes, np.array([0, 1]), 3, out.astype(np.int64))
    with pytest.raises(ValueError, match="seq_length"):
        kernels._kernels.sample_starts(sizes, np.array([0, 1], np.int32), 4, 0, out)
    # uint16 doc ids and int64 sizes are converted, not misread
    assert kernels.sample_starts(sizes.astype(np.int64), np.array([1, 0], dtype=np.uint16), 3, out) == 10
    assert out[1:].tolist() == [[0, 3], [1, 1], [1, 4]]
