"""The `loraplex` command line."""

import pytest

from loraplex.cli import main


def test_check_passes_on_a_small_model(capsys):
    assert main(["check", "--hidden-size", "128", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "7 linears checked" in out and "all ok" in out
    assert "0.5159 bytes/weight" in out


def test_check_rejects_a_width_that_is_not_a_multiple_of_64():
    with pytest.raises(SystemExit, match="multiple of 64"):
        main(["check", "--hidden-size", "100"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("loraplex ")


def test_quantize_writes_a_checkpoint_loraplex_serves_unchanged(tmp_path, capsys):
    import torch

    from loraplex.kernels import runtime
    from loraplex.model.loader import load_model
    from tests.factory import make_model

    make_model(tmp_path / "src", "llama", dtype=torch.bfloat16)
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    with runtime.reference_kernels():
        direct = load_model(tmp_path / "src", progress=False)
        stored = load_model(tmp_path / "dst", progress=False)
    assert stored.prequantized and not direct.prequantized
    for (name, a), b in zip(direct.model.linears().items(), stored.model.linears().values()):
        for pa, pb in zip(a.parts, b.parts):
            assert torch.equal(pa.codes, pb.codes) and torch.equal(pa.absmax, pb.absmax), name
    assert stored.tokenizer.encode("hello world") == direct.tokenizer.encode("hello world")


def test_quantize_reports_bad_input_without_a_traceback(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--device", "cpu"]) == 2
    assert "loraplex quantize:" in capsys.readouterr().err


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from loraplex.model.loader import load_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(tmp_path, progress=False)
