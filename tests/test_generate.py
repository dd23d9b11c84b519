"""Token sampling: greedy, top-k, top-p, seeds."""

import torch

from deepmoe.generate import sample_next


def test_greedy_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_next(logits).item() == 0
    seen = {sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1}
    # top_p 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it → tokens {0, 1}
    seen = {sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution_and_is_seeded():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, generator=g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.02)
    again = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_cli_generate_from_a_model_directory(tmp_path, capsys):
    import deepmoe
    from deepmoe.cli import main
    from deepmoe.tokenizer import train_bpe

    tok = train_bpe(["def foo(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 20, vocab_size=300)
    cfg = deepmoe.ModelConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size)
    deepmoe.save_pretrained(deepmoe.build_model(cfg), tmp_path)
    tok.save(tmp_path)
    args = ["generate", "--model", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "8"]
    outs = []
    for extra in ([], [], ["--temperature", "0.9", "--seed", "3"], ["--temperature", "0.9", "--seed", "3"]):
        assert main(args + extra) == 0
        outs.append(capsys.readouterr().out)
    assert all(o.startswith("def ") for o in outs)
    assert outs[0] == outs[1] and outs[2] == outs[3]  # greedy and seeded sampling are reproducible
