"""FAISS's side: the factory chosen by collection size, search parameters, GPU detection."""

import faiss
import torch

from absvl.retrieval import choose_factory, faiss_backend


def test_factory_choice_by_size():
    assert choose_factory(1_000, 256) == ("Flat", {})
    assert choose_factory(50_000, 256) == ("Flat", {})
    assert choose_factory(100_000, 256) == ("IVF1024,Flat", {"nprobe": 8})
    assert choose_factory(1_000_000, 256) == ("IVF4096,Flat", {"nprobe": 16})
    assert choose_factory(10_000_000, 256) == ("IVF16384,SQ8", {"nprobe": 64})
    assert faiss_backend.ivf_nlist(1_000_000) == 4096


def test_gpu_detection(monkeypatch):
    assert faiss_backend.gpu_available() == (hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available())
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert faiss_backend.gpu_available()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert not faiss_backend.gpu_available()
    monkeypatch.delattr(faiss, "StandardGpuResources")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert not faiss_backend.gpu_available()
    assert faiss_backend.to_cpu(faiss_backend.to_gpu(faiss.IndexFlatIP(4))).d == 4  # no GPU: unchanged, on CPU
