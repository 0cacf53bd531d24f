"""No loader unpickles arbitrary objects: state.pt (train.py / embed.py --resume) and user .pt gene tables
load with weights_only=True, and a crafted file is refused without running its payload."""

import os
import random

import numpy as np
import pytest
import torch

from state.ckpt import load_state
from state.dist import rng_state, set_rng_state


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_crafted_state_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"step": 3, "x": Payload()}, tmp_path / "state.pt")
    with pytest.raises(SystemExit, match="refusing to unpickle"):
        load_state(tmp_path / "state.pt")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_gene_table_pt_is_not_unpickled(tmp_path, monkeypatch):
    from state.se import load_gene_vectors
    monkeypatch.chdir(tmp_path)
    torch.save({"A": torch.ones(4), "B": Payload()}, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_gene_vectors(tmp_path / "g.pt")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    torch.save({"A": torch.ones(4), "B": torch.zeros(4)}, tmp_path / "ok.pt")  # plain tensors still load
    names, V = load_gene_vectors(tmp_path / "ok.pt")
    assert names == ["A", "B"] and V.shape == (2, 4)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    want = (torch.rand(3), np.random.normal(size=3), random.random())
    set_rng_state(load_state(tmp_path / "s.pt")["rng"])
    got = (torch.rand(3), np.random.normal(size=3), random.random())
    torch.testing.assert_close(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]
