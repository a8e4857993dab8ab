import logging

import torch

from cliprec import precision


def test_amp_off_is_a_noop():
    x = torch.randn(4, 4)
    with precision.autocast("cpu", amp=False):
        assert (x @ x).dtype == torch.float32
    assert not precision.grad_scaler("cpu", amp=False).is_enabled()


def test_amp_on_cpu_is_bf16_without_scaler_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    x = torch.randn(4, 4)
    with caplog.at_level(logging.WARNING, logger="cliprec.precision"):
        for _ in range(3):
            with precision.autocast("cpu", amp=True):
                assert (x @ x).dtype == torch.bfloat16
    assert sum("no native bf16" in r.message for r in caplog.records) == 1
    assert precision.amp_dtype("cpu") == torch.bfloat16
    assert not precision.grad_scaler("cpu", amp=True).is_enabled()  # bf16 needs no loss scaling


def test_no_warning_on_a_cpu_with_bf16(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    with caplog.at_level(logging.WARNING, logger="cliprec.precision"), precision.autocast("cpu", amp=True):
        pass
    assert not caplog.records


def test_fp16_gets_a_grad_scaler(monkeypatch):
    monkeypatch.setattr(precision, "amp_dtype", lambda device: torch.float16)
    assert precision.grad_scaler("cpu", amp=True).is_enabled()
    assert not precision.grad_scaler("cpu", amp=False).is_enabled()


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.pick_device() == torch.device("cpu")
    assert precision.pick_device("meta") == torch.device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.pick_device().type == "cuda"


def test_cpu_flags_are_read(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags : fpu sse2 avx avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    assert not precision.cpu_has_native_bf16(str(avx2))
    assert precision.cpu_has_native_bf16(str(amx))
    assert precision.cpu_has_native_bf16(str(tmp_path / "absent"))  # unknown OS: do not nag
