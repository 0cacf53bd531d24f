import h5py
import numpy as np
import pytest

from state.h5ad import H5AD, H5ADError, write_h5ad


def test_read_real_csr(papalexi_path):
    with H5AD(papalexi_path) as h:
        assert (h.n_obs, h.n_vars) == (19763, 299)
        tg = h.column("target_gene")
        assert "non-targeting" in set(tg) and len(tg) == h.n_obs
        M = h.matrix("X")
        assert M.sparse and M.shape == (19763, 299)
        idx = [5, 0, 4000, 4001, 19762]
        rows = M.rows(idx)
        for j, i in enumerate(idx):  # rows() in any order equals block() row by row
            np.testing.assert_array_equal(rows[j], M.block(i, i + 1)[0])
        assert h.matrix("counts").key == "layers/counts"


def test_missing_column_names_it(kang_path):
    with H5AD(kang_path) as h, pytest.raises(H5ADError, match="no obs column 'batchx'.*cell_type"):
        h.column("batchx")


def test_not_anndata(tmp_path):
    p = tmp_path / "plain.h5"
    with h5py.File(p, "w") as f:
        f["a"] = np.arange(3)
    with pytest.raises(H5ADError, match="not an AnnData"):
        H5AD(p)
    q = tmp_path / "text.h5ad"
    q.write_text("hello")
    with pytest.raises(H5ADError, match="not an HDF5"):
        H5AD(q)


def test_csc_rejected(tmp_path):
    p = tmp_path / "csc.h5ad"
    csr = (np.ones(3, np.float32), np.arange(3), np.arange(4))  # identity as a CSR triple
    write_h5ad(p, csr, ["a", "b", "c"], ["g1", "g2", "g3"])
    with h5py.File(p, "r+") as f:
        f["X"].attrs["encoding-type"] = "csc_matrix"
    with H5AD(p) as h, pytest.raises(H5ADError, match="CSC"):
        h.matrix("X")


def test_roundtrip_dense_and_csr(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.random((6, 4)).astype(np.float32) * (rng.random((6, 4)) > 0.5)
    obs = {"pert": np.array(["a", "b", None, "a", "c", "b"], dtype=object), "n": np.arange(6)}
    uns = {"nanostate": {"pert_col": "pert", "genes": ["g0", "g1", "g2", "g3"], "k": 3}}
    names = [f"cell{i}" for i in range(6)]
    genes = [f"g{i}" for i in range(4)]
    p = tmp_path / "d.h5ad"
    write_h5ad(p, X, names, genes, obs=obs, uns=uns, obsm={"e": X[:, :2]})
    indptr = np.r_[0, np.cumsum((X > 0).sum(1))]
    q = tmp_path / "s.h5ad"
    write_h5ad(q, (X[X > 0], np.nonzero(X)[1], indptr), names, genes, obs=obs)
    for path in (p, q):
        with H5AD(path) as h:
            np.testing.assert_array_equal(h.matrix("X").block(0, 6), X)
            assert list(h.obs_names) == names and list(h.var_names()) == genes
            assert list(h.column("pert")) == ["a", "b", None, "a", "c", "b"]
            np.testing.assert_array_equal(h.column("n"), np.arange(6))
    with H5AD(p) as h:
        assert h.uns("nanostate") == uns["nanostate"]
        np.testing.assert_array_equal(h.matrix("obsm/e").block(0, 6), X[:, :2])


def test_anndata_reads_our_files(tmp_path):
    ad = pytest.importorskip("anndata", reason="anndata not installed (comes with the parity extra)")
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    p = tmp_path / "o.h5ad"
    write_h5ad(p, X, list("wxyz"), ["A", "B", "C"], obs={"t": np.array(["u", "v", "u", "v"])},
               uns={"nanostate": {"source": "test"}})
    a = ad.read_h5ad(p)
    np.testing.assert_array_equal(np.asarray(a.X), X)
    assert list(a.obs["t"]) == ["u", "v", "u", "v"] and str(a.obs["t"].dtype) == "category"
    assert list(a.var_names) == ["A", "B", "C"] and a.uns["nanostate"]["source"] == "test"
