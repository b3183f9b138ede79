"""The sampling kernel (kernels/sampling.py): greedy rows are torch's argmax, no draw falls below its row's cut,
draws follow softmax(x / T), and a row's pick depends on its own logits and key only."""

import pytest
import torch

from kubrick.engine.kernels.sampling import sample

from .helpers import compiles_once_for_every_batch

NEG_INF = float("-inf")


def _keys(n: int, start: int = 0) -> torch.Tensor:
    return (torch.arange(start, start + n, dtype=torch.int64) * 0x9E3779B1 + 12345) % 2**62


def test_greedy_rows_are_the_first_maximum_over_several_splits(device):
    x = torch.randn(3, 3000, generator=torch.Generator().manual_seed(0))
    x[1, 40] = x[1, 2900] = 10.0  # a tie, the two in different splits: the lower id wins, as in torch.argmax
    x = x.to(device)
    picks = sample(x, torch.zeros(3, device=device), torch.full((3,), NEG_INF, device=device), _keys(3).to(device),
                   block=64)
    assert picks.tolist() == x.argmax(-1).tolist() and picks[1] == 40


def test_draws_stay_at_or_above_the_cut_and_reach_every_token_above_it(device):
    rows = 64
    x = torch.tensor([3.0, 2.9, 2.8, 2.7, 0.5, 0.4, 0.3, 5.0, 2.75, -1.0]).repeat(rows, 1).to(device)
    cut = torch.full((rows,), 2.7, device=device)
    picks = sample(x, torch.full((rows,), 3.0, device=device), cut, _keys(rows).to(device), block=16)
    assert set(picks.tolist()) <= {0, 1, 2, 3, 7, 8}
    assert len(set(picks.tolist())) >= 4  # at T = 3 the six are close: a draw, not an argmax


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_draws_follow_the_softmax_at_the_temperature(device, temperature):
    rows = 256  # one draw a row (the interpreter runs one program at a time)
    logits = torch.tensor([4.0, 3.0, 2.0, 0.0, -1.0])
    picks = sample(logits.repeat(rows, 1).to(device), torch.full((rows,), temperature, device=device),
                   torch.full((rows,), NEG_INF, device=device), _keys(rows, start=1000).to(device), block=16)
    seen = torch.bincount(picks.cpu(), minlength=5) / rows
    assert (seen - torch.softmax(logits / temperature, 0)).abs().max() < 0.1  # ~3.5 standard errors


def test_a_row_s_pick_depends_on_its_own_logits_and_key_only(device):
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.tensor([1.0, 0.0, 0.7, 1.5, 1.0, 2.0], device=device)
    cut = torch.full((6,), NEG_INF, device=device)
    keys = _keys(6).to(device)
    picks = sample(x, t, cut, keys, block=32)
    order = torch.tensor([4, 2, 0, 5, 3, 1], device=device)
    assert sample(x[order], t[order], cut[order], keys[order], block=32).tolist() == picks[order].tolist()
    assert sample(x[2:3], t[2:3], cut[2:3], keys[2:3], block=32).item() == picks[2].item()  # alone: more splits
    other = sample(x, t, cut, keys + 1, block=32)
    assert other.tolist() != picks.tolist()  # another key, other draws


@pytest.mark.gpu
def test_the_real_vocabulary_in_bf16_on_the_gpu():
    vocab, rows = 201_088, 64
    x = torch.randn(rows, vocab, device="cuda").to(torch.bfloat16)  # bf16: ties between maxima are common
    wide = torch.empty(rows, vocab + 64, device="cuda", dtype=torch.bfloat16)
    wide[:, :vocab] = x  # a padded vocabulary: the first columns of wider rows
    none = torch.full((rows,), NEG_INF, device="cuda")
    assert torch.equal(sample(wide[:, :vocab], torch.zeros(rows, device="cuda"), none, _keys(rows).cuda()),
                       x.argmax(-1))
    peaked = torch.full((4096, vocab), -20.0, device="cuda")
    peaked[:, :4] = torch.tensor([2.0, 1.0, 0.0, -1.0], device="cuda")
    picks = sample(peaked, torch.ones(4096, device="cuda"), torch.full((4096,), NEG_INF, device="cuda"),
                   _keys(4096).cuda())
    seen = torch.bincount(picks.cpu(), minlength=4)[:4] / 4096
    assert (seen - torch.softmax(peaked[0, :4].cpu(), 0)).abs().max() < 0.03


@pytest.mark.gpu
def test_sample_rows_on_the_gpu_keeps_a_seeded_request_s_draws_and_its_nucleus():
    # As the scheduler calls it: settings copied from pinned memory, the top-p sort, then the kernel.
    from kubrick.engine.api import SamplingParams
    from kubrick.engine.sampler import Sampler, sample_rows

    logits = (torch.randn(4, 201_088, device="cuda") * 3).to(torch.bfloat16)
    params = SamplingParams(temperature=0.8, top_p=0.5, seed=11)
    alone, mine = Sampler(params), Sampler(params)
    others = [Sampler(SamplingParams(temperature=t, top_k=k, seed=s)) for t, k, s in ((1.0, 0, 1), (0.0, 0, 2), (1.5, 40, 3))]
    solo = [int(sample_rows(logits[1:2], [alone])[0]) for _ in range(20)]
    batched = [int(sample_rows(logits, [others[0], mine, others[1], others[2]])[1]) for _ in range(20)]
    assert batched == solo
    probs = torch.softmax(logits[1].float() / 0.8, 0)
    ordered, order = probs.sort(descending=True)
    last = order[int(((ordered.cumsum(0) - ordered) < 0.5).sum()) - 1]
    nucleus = set(torch.nonzero(logits[1] >= logits[1, last]).flatten().tolist())  # ties at the cut are kept
    assert set(solo) <= nucleus and len(set(solo)) > 1


@pytest.mark.gpu
def test_one_compiled_kernel_pair_serves_every_batch_size():
    from kubrick.engine.kernels import sampling

    x = torch.randn(64, 201_088, device="cuda")  # 197 splits of a row at 1 row, 33 at 64
    assert compiles_once_for_every_batch(
        (sampling._split_best_kernel, sampling._combine_kernel),
        lambda rows: sample(x[:rows], torch.ones(rows, device="cuda"), torch.full((rows,), NEG_INF, device="cuda"),
                            _keys(rows).cuda()))
