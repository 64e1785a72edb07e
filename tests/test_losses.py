"""Tests for ``nca_trl.losses`` (the math in the README's "The math" section and the API in its "Use it like DPOTrainer").

Every expectation is checked against an independent float64 reference written as plain Python
loops over rows and slots (``math.exp`` / ``math.log`` and a hand-written log-sum-exp; no torch
softmax), against hand-computed numbers, or against TRL's own ``nca_pair`` code.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

from nca_trl.losses import infonca_loss, nca_loss, reward_targets

ALPHAS = [0, 1e-6, 0.1, 1.0, 10.0]
BETAS = [0.01, 0.1, 1]
SEEDS = [0, 1, 2, 3, 4, 5]


# --------------------------------------------------------------------------------------------
# Independent float64 reference (plain Python loops)
# --------------------------------------------------------------------------------------------


def _log_softmax(xs):
    # (x_i - m) - log sum_j exp(x_j - m): never adds m back, so exact on any scale (e.g. r / alpha = 1e14)
    m = max(xs)
    s = math.log(sum(math.exp(x - m) for x in xs))
    return [(x - m) - s for x in xs]


def _logsigmoid(x):
    # log sigmoid(x) = -softplus(-x), computed stably
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def _sigmoid(x):
    return math.exp(_logsigmoid(x))


def ref_targets_row(r, alpha):
    """p over the valid rewards of one row."""
    if alpha == 0:
        m = max(r)
        n = sum(1 for x in r if x == m)
        return [1.0 / n if x == m else 0.0 for x in r]
    return [math.exp(v) for v in _log_softmax([x / alpha for x in r])]


def ref_infonca_row(lr, r, beta, alpha):
    """Returns (loss, dloss/dlogratio) for one row of valid slots."""
    g = [beta * x for x in lr]
    p = ref_targets_row(r, alpha)
    lq = _log_softmax(g)
    loss = -sum(pi * lqi for pi, lqi in zip(p, lq))
    grad = [beta * (math.exp(lqi) - pi) for pi, lqi in zip(p, lq)]
    return loss, grad


def ref_nca_row(lr, r, beta, alpha):
    g = [beta * x for x in lr]
    p = ref_targets_row(r, alpha)
    k = len(g)
    loss = -sum(pi * _logsigmoid(gi) for pi, gi in zip(p, g)) - sum(_logsigmoid(-gi) for gi in g) / k
    grad = [beta * (-pi * _sigmoid(-gi) + _sigmoid(gi) / k) for pi, gi in zip(p, g)]
    return loss, grad


REF_ROW = {"infonca": ref_infonca_row, "nca": ref_nca_row}
LOSS_FN = {"infonca": infonca_loss, "nca": nca_loss}


def _rows(logratios, rewards, mask):
    """Yields (b, valid_idx, lr_list, r_list) with exact float values of the given tensors."""
    lr = logratios.detach().double().tolist()
    rw = rewards.detach().double().tolist()
    B, K = len(lr), len(lr[0])
    mk = [[True] * K for _ in range(B)] if mask is None else mask.tolist()
    for b in range(B):
        idx = [i for i in range(K) if mk[b][i]]
        yield b, idx, [lr[b][i] for i in idx], [rw[b][i] for i in idx]


def ref_batch(name, logratios, rewards, beta, alpha, mask=None):
    """Reference loss [B] and gradient of loss.sum() w.r.t. logratios [B, K] (float64)."""
    B, K = logratios.shape
    losses = [0.0] * B
    grads = [[0.0] * K for _ in range(B)]
    for b, idx, lr, r in _rows(logratios, rewards, mask):
        loss, grad = REF_ROW[name](lr, r, beta, alpha)
        losses[b] = loss
        for i, gi in zip(idx, grad):
            grads[b][i] = gi
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


def ref_targets_batch(rewards, alpha, mask=None):
    B, K = rewards.shape
    out = [[0.0] * K for _ in range(B)]
    for b, idx, _, r in _rows(rewards, rewards, mask):
        for i, pi in zip(idx, ref_targets_row(r, alpha)):
            out[b][i] = pi
    return torch.tensor(out, dtype=torch.float64)


def random_batch(seed, prefix_padding=None):
    """Random ragged batch: B in 1..8, K in 2..6, K_b in 2..K. Masked slots hold random junk."""
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 9, (1,), generator=g))
    K = int(torch.randint(2, 7, (1,), generator=g))
    if prefix_padding is None:
        prefix_padding = seed % 2 == 0
    mask = torch.zeros(B, K, dtype=torch.bool)
    for b in range(B):
        kb = int(torch.randint(2, K + 1, (1,), generator=g))
        if prefix_padding:
            mask[b, :kb] = True
        else:
            mask[b, torch.randperm(K, generator=g)[:kb]] = True
    logratios = torch.randn(B, K, generator=g) * 5.0
    rewards = torch.randn(B, K, generator=g) * 2.0
    return logratios, rewards, mask


def assert_close64(got, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.detach().double(), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Sanity of the reference itself: analytic gradients vs central finite differences (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("alpha", [0, 0.5, 3.0])
def test_reference_gradient_matches_finite_differences(name, alpha):
    lr = [0.7, -1.3, 2.1, 0.05]
    r = [1.0, 2.5, -0.5, 2.5]
    beta = 0.7
    _, grad = REF_ROW[name](lr, r, beta, alpha)
    h = 1e-6
    for i in range(len(lr)):
        up = list(lr)
        dn = list(lr)
        up[i] += h
        dn[i] -= h
        fd = (REF_ROW[name](up, r, beta, alpha)[0] - REF_ROW[name](dn, r, beta, alpha)[0]) / (2 * h)
        assert abs(fd - grad[i]) < 1e-7


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def test_hand_infonca_k2_one_hot():
    # g = (0.3, -0.2), p = (1, 0): -log softmax(g)_0 = log(1 + exp(-0.5))
    out = infonca_loss(_t([[0.3, -0.2]]), _t([[1.0, 0.0]]), beta=1.0, alpha=0)
    assert out.shape == (1,)
    assert out.dtype == torch.float32
    assert abs(out.item() - 0.4740769841801067) < 1e-6


def test_hand_infonca_beta_scales_logratios():
    # logratios (3, -2) with beta 0.1 is g = (0.3, -0.2): same number as above
    out = infonca_loss(_t([[3.0, -2.0]]), _t([[5.0, 1.0]]), beta=0.1, alpha=0)
    assert abs(out.item() - 0.4740769841801067) < 1e-6


def test_hand_infonca_k3_uniform_targets():
    # equal rewards -> p = 1/3 each; L = lse(g) - mean(g) = log(e + 1 + 1/e) for g = (1, 0, -1)
    for alpha in (0, 1.0, 7.0):
        out = infonca_loss(_t([[1.0, 0.0, -1.0]]), _t([[2.0, 2.0, 2.0]]), beta=1.0, alpha=alpha)
        assert abs(out.item() - 1.4076059644443804) < 1e-6


def test_hand_nca_k3_one_hot():
    # p = (1, 0, 0), g = (1, 0, -1):
    # -logsig(1) - (logsig(-1) + logsig(0) + logsig(1)) / 3 = 1.0864852060503531
    out = nca_loss(_t([[1.0, 0.0, -1.0]]), _t([[5.0, 1.0, 1.0]]), beta=1.0, alpha=0)
    assert abs(out.item() - 1.0864852060503531) < 1e-6


def test_hand_nca_k2_one_hot_and_uniform():
    # one-hot: -logsig(0.3) - 0.5 logsig(-0.3) - 0.5 logsig(0.2) = 1.2806023013935866
    out = nca_loss(_t([[0.3, -0.2]]), _t([[1.0, 0.0]]), beta=1.0, alpha=0)
    assert abs(out.item() - 1.2806023013935866) < 1e-6
    # uniform (equal rewards): 0.5 * sum_i [softplus(g_i) + softplus(-g_i)] = 1.4024941138501188
    out = nca_loss(_t([[0.3, -0.2]]), _t([[4.0, 4.0]]), beta=1.0, alpha=1.0)
    assert abs(out.item() - 1.4024941138501188) < 1e-6


def test_hand_zero_logratios_constants():
    # at step 0 with the implicit reference: NCA = 2 log 2, InfoNCA = log K (any targets)
    lr = torch.zeros(3, 4)
    rw = _t([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [9.0, -1.0, 3.0, 3.0]])
    mask = _t([[True, True, True, True], [True, True, False, False], [True, True, True, False]], torch.bool)
    for alpha in (0, 1.0):
        nca = nca_loss(lr, rw, beta=0.1, alpha=alpha, mask=mask)
        info = infonca_loss(lr, rw, beta=0.1, alpha=alpha, mask=mask)
        torch.testing.assert_close(nca, torch.full((3,), 2 * math.log(2)), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(info, _t([math.log(4), math.log(2), math.log(3)]), rtol=1e-6, atol=1e-6)


def test_hand_reward_targets():
    # softmax((0, 2) / 2) = (1/(1+e), e/(1+e))
    p = reward_targets(_t([[0.0, 2.0]]), alpha=2.0)
    assert p.shape == (1, 2)
    torch.testing.assert_close(p, _t([[0.2689414213699951, 0.7310585786300049]]), rtol=1e-6, atol=1e-6)
    # softmax((0, ln 3)) = (0.25, 0.75)
    p = reward_targets(_t([[0.0, math.log(3.0)]]), alpha=1.0)
    torch.testing.assert_close(p, _t([[0.25, 0.75]]), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Random ragged batches vs the loop reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_reward_targets_random_vs_reference(seed):
    _, rewards, mask = random_batch(seed)
    for alpha in ALPHAS:
        p = reward_targets(rewards, alpha, mask=mask)
        assert p.shape == rewards.shape
        assert p.dtype == torch.float32
        assert_close64(p, ref_targets_batch(rewards, alpha, mask))
        assert torch.all(p[~mask] == 0)
        torch.testing.assert_close(p.sum(dim=1), torch.ones(p.shape[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("seed", SEEDS)
def test_losses_random_ragged_vs_reference(name, seed):
    logratios, rewards, mask = random_batch(seed)
    fn = LOSS_FN[name]
    for alpha in ALPHAS:
        for beta in BETAS:
            lr = logratios.clone().requires_grad_(True)
            out = fn(lr, rewards, beta=beta, alpha=alpha, mask=mask)
            exp_loss, exp_grad = ref_batch(name, logratios, rewards, beta, alpha, mask)
            assert out.shape == (logratios.shape[0],)
            assert out.dtype == torch.float32
            assert_close64(out, exp_loss)
            out.sum().backward()
            assert lr.grad is not None
            assert_close64(lr.grad, exp_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_losses_full_batch_mask_none(name):
    # no mask: every slot valid; same as an all-True mask
    g = torch.Generator().manual_seed(11)
    logratios = torch.randn(5, 4, generator=g) * 3
    rewards = torch.randn(5, 4, generator=g)
    fn = LOSS_FN[name]
    for alpha in (0, 0.5):
        out = fn(logratios, rewards, beta=0.3, alpha=alpha)
        exp_loss, _ = ref_batch(name, logratios, rewards, 0.3, alpha, None)
        assert_close64(out, exp_loss)
        out_mask = fn(logratios, rewards, beta=0.3, alpha=alpha, mask=torch.ones(5, 4, dtype=torch.bool))
        torch.testing.assert_close(out, out_mask, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# alpha = 0, tiny alpha, huge rewards
# --------------------------------------------------------------------------------------------


def test_alpha0_ties_split_evenly():
    p = reward_targets(_t([[3.0, 3.0, 1.0]]), 0)
    torch.testing.assert_close(p, _t([[0.5, 0.5, 0.0]]), rtol=0, atol=1e-7)
    p = reward_targets(_t([[2.0, 2.0, 2.0, 2.0]]), 0.0)
    torch.testing.assert_close(p, torch.full((1, 4), 0.25), rtol=0, atol=1e-7)
    p = reward_targets(_t([[1.0, 7.0, 7.0, 7.0]]), 0)
    torch.testing.assert_close(p, _t([[0.0, 1 / 3, 1 / 3, 1 / 3]]), rtol=0, atol=1e-7)


def test_alpha0_ties_respect_mask():
    # the masked 3 does not share the mass; a masked larger reward is not the max
    rewards = _t([[3.0, 3.0, 1.0], [1.0, 100.0, 0.0]])
    mask = _t([[True, False, True], [True, False, True]], torch.bool)
    p = reward_targets(rewards, 0, mask=mask)
    torch.testing.assert_close(p, _t([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), rtol=0, atol=1e-7)


def test_tiny_alpha_with_ties_split_evenly():
    p = reward_targets(_t([[3.0, 3.0, 1.0]]), 1e-8)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, _t([[0.5, 0.5, 0.0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_an_alpha_that_float32_rounds_to_zero_is_the_one_hot_limit(name):
    """A Python float alpha below float32's smallest subnormal (~1.4e-45) became 0 in the division: 0/0 = NaN
    targets and a NaN loss. It is the alpha -> 0 limit, as a tensor alpha was."""
    rewards, logratios = _t([[3.0, 2.0, 1.0]]), _t([[0.3, -0.2, 0.1]])
    for alpha in (1e-46, 1e-300):
        torch.testing.assert_close(reward_targets(rewards, alpha), _t([[1.0, 0.0, 0.0]]))
        loss = LOSS_FN[name](logratios, rewards, 0.1, alpha)
        torch.testing.assert_close(loss, LOSS_FN[name](logratios, rewards, 0.1, 0.0))


@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_tiny_alpha_equals_alpha0_when_rewards_differ(name):
    g = torch.Generator().manual_seed(3)
    logratios = torch.randn(4, 5, generator=g) * 4
    # distinct rewards (gaps >= 0.01)
    rewards = torch.stack([torch.randperm(5, generator=g).float() * 0.01 + b for b in range(4)])
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 0] = False
    fn = LOSS_FN[name]
    p0 = reward_targets(rewards, 0, mask=mask)
    pt = reward_targets(rewards, 1e-8, mask=mask)
    assert torch.isfinite(pt).all()
    torch.testing.assert_close(pt, p0, rtol=0, atol=1e-6)
    l0 = fn(logratios, rewards, beta=0.1, alpha=0, mask=mask)
    lt = fn(logratios, rewards, beta=0.1, alpha=1e-8, mask=mask)
    assert torch.isfinite(lt).all()
    torch.testing.assert_close(lt, l0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("alpha", [0, 1e-8, 1.0, 1e3, 1e6, 1e9])
def test_huge_rewards_finite_and_correct(name, alpha):
    g = torch.Generator().manual_seed(7)
    logratios = torch.randn(3, 4, generator=g) * 3
    rewards = torch.randn(3, 4, generator=g) * 1e6
    rewards[1] = _t([1e6, -1e6, 5e5, 1e6])  # tie at the top on a huge scale
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    fn = LOSS_FN[name]
    p = reward_targets(rewards, alpha, mask=mask)
    assert torch.isfinite(p).all()
    assert_close64(p, ref_targets_batch(rewards, alpha, mask), rtol=1e-4, atol=1e-4)
    lr = logratios.clone().requires_grad_(True)
    out = fn(lr, rewards, beta=0.5, alpha=alpha, mask=mask)
    assert torch.isfinite(out).all()
    exp_loss, exp_grad = ref_batch(name, logratios, rewards, 0.5, alpha, mask)
    assert_close64(out, exp_loss, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert torch.isfinite(lr.grad).all()
    assert_close64(lr.grad, exp_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_extreme_logratios_finite(name):
    logratios = _t([[1e4, -1e4, 0.0], [-3e4, 2e4, 5.0]])
    rewards = _t([[0.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    fn = LOSS_FN[name]
    for alpha in (0, 1.0):
        lr = logratios.clone().requires_grad_(True)
        out = fn(lr, rewards, beta=1.0, alpha=alpha)
        assert torch.isfinite(out).all()
        exp_loss, exp_grad = ref_batch(name, logratios, rewards, 1.0, alpha)
        assert_close64(out, exp_loss)
        out.sum().backward()
        assert torch.isfinite(lr.grad).all()
        assert_close64(lr.grad, exp_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs_give_float32(name, dtype):
    logratios, rewards, mask = random_batch(1)
    lr_d = logratios.to(dtype)
    rw_d = rewards.to(dtype)
    fn = LOSS_FN[name]
    for alpha in (0, 1.0):
        lr = lr_d.clone().requires_grad_(True)
        out = fn(lr, rw_d, beta=0.1, alpha=alpha, mask=mask)
        assert out.dtype == torch.float32
        # same (cast) values in float32
        expected = fn(lr_d.float(), rw_d.float(), beta=0.1, alpha=alpha, mask=mask)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        assert_close64(out, ref_batch(name, lr_d, rw_d, 0.1, alpha, mask)[0])
        out.sum().backward()
        assert lr.grad is not None
        assert torch.isfinite(lr.grad.float()).all()
        p = reward_targets(rw_d, alpha, mask=mask)
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, reward_targets(rw_d.float(), alpha, mask=mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_mixed_input_dtypes(name):
    # bf16 log-ratios from the model, float64 rewards from the dataset
    logratios, rewards, mask = random_batch(2)
    lr_bf = logratios.to(torch.bfloat16)
    rw64 = rewards.double()
    out = LOSS_FN[name](lr_bf, rw64, beta=0.1, alpha=1.0, mask=mask)
    assert out.dtype == torch.float32
    assert_close64(out, ref_batch(name, lr_bf, rw64.float(), 0.1, 1.0, mask)[0])


# --------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------


def _pair_batch(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    l_c = torch.randn(n, generator=g, dtype=torch.float64) * 4
    l_r = torch.randn(n, generator=g, dtype=torch.float64) * 4
    return l_c, l_r


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha", [0, 1e-8])
def test_infonca_k2_one_hot_is_dpo_sigmoid(beta, alpha):
    l_c, l_r = _pair_batch(0)
    logratios = torch.stack([l_c, l_r], dim=1).float()
    rewards = torch.tensor([[1.0, 0.0]]).expand(len(l_c), 2)
    out = infonca_loss(logratios, rewards, beta=beta, alpha=alpha)
    lc, lrj = logratios[:, 0].double(), logratios[:, 1].double()
    dpo = -F.logsigmoid(beta * (lc - lrj))
    assert_close64(out, dpo)
    # also with the chosen completion in the second slot
    out_swapped = infonca_loss(logratios.flip(1), rewards.flip(1), beta=beta, alpha=alpha)
    assert_close64(out_swapped, dpo)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha", [0, 1e-8])
def test_nca_k2_one_hot_is_trl_nca_pair_formula(beta, alpha):
    l_c, l_r = _pair_batch(1)
    logratios = torch.stack([l_c, l_r], dim=1).float()
    rewards = torch.tensor([[1.0, 0.0]]).expand(len(l_c), 2)
    out = nca_loss(logratios, rewards, beta=beta, alpha=alpha)
    gc, gr = beta * logratios[:, 0].double(), beta * logratios[:, 1].double()
    nca_pair = -F.logsigmoid(gc) - 0.5 * F.logsigmoid(-gc) - 0.5 * F.logsigmoid(-gr)
    assert_close64(out, nca_pair)


def _trl_nca_pair_branch():
    """Source of the ``nca_pair`` branch of TRL's installed DPOTrainer (read, not imported: cheap)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "trainer" / "dpo_trainer.py"
    if not path.exists():
        pytest.skip("trl/trainer/dpo_trainer.py not found")
    lines = path.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if '"nca_pair"' in ln and ln.strip().startswith(("if", "elif"))), None)
    if start is None:
        pytest.skip("no nca_pair branch in this TRL version")
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for ln in lines[start + 1 :]:
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break
        body.append(ln)
    return textwrap.dedent("\n".join(body))


@pytest.mark.parametrize("beta", BETAS)
def test_nca_k2_one_hot_equals_trl_nca_pair_code(beta):
    code = _trl_nca_pair_branch()
    l_c, l_r = _pair_batch(2)
    chosen = l_c.float()
    rejected = l_r.float()
    ns = {
        "self": types.SimpleNamespace(beta=beta, label_smoothing=0.0),
        "chosen_logratios": chosen,
        "rejected_logratios": rejected,
        "F": F,
        "torch": torch,
    }
    exec(compile(code, "trl_nca_pair", "exec"), ns)
    trl_loss = ns["per_sequence_loss"]
    ours = nca_loss(torch.stack([chosen, rejected], dim=1), torch.tensor([[1.0, 0.0]]).expand(len(l_c), 2), beta=beta, alpha=0)
    torch.testing.assert_close(ours, trl_loss.float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------


def _grid_rewards(seed, B, K):
    # quarter-integers: shifts/scales below are exact in float32
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (B, K), generator=g).float() / 4


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("alpha", [0, 0.1, 1.0, 10.0])
def test_reward_shift_invariance(name, alpha):
    logratios, _, mask = random_batch(4)
    B, K = logratios.shape
    rewards = _grid_rewards(4, B, K)
    shifts = torch.tensor([37.0, -1000.0, 0.5, 3.0, -2.25, 100.0, 7.0, -8.0])[:B, None]
    fn = LOSS_FN[name]
    base = fn(logratios, rewards, beta=0.1, alpha=alpha, mask=mask)
    shifted = fn(logratios, rewards + shifts, beta=0.1, alpha=alpha, mask=mask)
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        reward_targets(rewards + shifts, alpha, mask=mask), reward_targets(rewards, alpha, mask=mask), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("offset", [1e5, 1e8, -2e6])
def test_float64_rewards_are_shifted_in_float64(offset):
    """float64 rewards went to float32 before the row max was subtracted: [3, 2, 0] + 1e8 gave uniform targets (the
    differences rounded away), and alpha = 0.05 on rewards + 1e5 a target 0.00141 for 0.00127."""
    for rewards, alpha in (([[3.0, 2.0, 0.0]], 1.0), ([[4.6667, 4.3333, 4.0]], 0.05)):
        rewards = torch.tensor(rewards, dtype=torch.float64)
        torch.testing.assert_close(reward_targets(rewards + offset, alpha), reward_targets(rewards, alpha))
        for fn in (infonca_loss, nca_loss):
            torch.testing.assert_close(fn(torch.zeros(1, 3), rewards + offset, beta=0.1, alpha=alpha),
                                       fn(torch.zeros(1, 3), rewards, beta=0.1, alpha=alpha))


@pytest.mark.parametrize("fn", [nca_loss, infonca_loss])
def test_a_nan_alpha_or_a_non_finite_reward_is_refused(fn):
    """alpha=NaN passed the `alpha < 0` check and gave one-hot targets; an infinite reward gave NaN targets."""
    for alpha in (float("nan"), torch.tensor([0.5, float("nan")])):
        with pytest.raises(ValueError, match="alpha must be >= 0"):
            fn(LR, RW, beta=0.1, alpha=alpha)
    bad = RW.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"rewards must be finite where `mask` is True: row 1 has \[0.0, 1.0, inf\]"):
        fn(LR, bad, beta=0.1, alpha=1.0)
    masked = torch.tensor([[True, True, True], [True, True, False]])  # a padded slot may hold anything
    assert torch.isfinite(fn(LR, bad, beta=0.1, alpha=1.0, mask=masked)).all()


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("c", [0.5, 2.0, 3.0, 100.0])
def test_reward_scale_equals_alpha_divided(name, c):
    logratios, _, mask = random_batch(5)
    B, K = logratios.shape
    rewards = _grid_rewards(5, B, K)
    fn = LOSS_FN[name]
    for alpha in (0.1, 1.0, 10.0):
        a = fn(logratios, rewards * c, beta=0.1, alpha=alpha, mask=mask)
        b = fn(logratios, rewards, beta=0.1, alpha=alpha / c, mask=mask)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # alpha = 0 is scale invariant
    a = fn(logratios, rewards * c, beta=0.1, alpha=0, mask=mask)
    b = fn(logratios, rewards, beta=0.1, alpha=0, mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Masked slots and raggedness
# --------------------------------------------------------------------------------------------


def _fill_garbage(t, mask):
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e9, -1e9], dtype=t.dtype)
    out = t.clone()
    pos = (~mask).nonzero()
    for j, (b, i) in enumerate(pos.tolist()):
        out[b, i] = garbage[j % len(garbage)]
    return out


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_masked_garbage_changes_nothing(name, seed):
    logratios, rewards, mask = random_batch(seed)
    if mask.all():
        mask[0, -1] = False
        mask[0, 0] = True
        mask[0, 1] = True
    clean_lr = logratios.masked_fill(~mask, 0.0)
    clean_rw = rewards.masked_fill(~mask, 0.0)
    fn = LOSS_FN[name]
    for alpha in (0, 1e-8, 1.0):
        for lr_in, rw_in in ((_fill_garbage(logratios, mask), _fill_garbage(rewards, mask)),
                             (_fill_garbage(logratios, mask), rewards.masked_fill(~mask, float("nan"))),
                             (logratios.masked_fill(~mask, float("inf")), rewards.masked_fill(~mask, float("inf")))):
            lr_c = clean_lr.clone().requires_grad_(True)
            lr_g = lr_in.clone().requires_grad_(True)
            ref_out = fn(lr_c, clean_rw, beta=0.1, alpha=alpha, mask=mask)
            out = fn(lr_g, rw_in, beta=0.1, alpha=alpha, mask=mask)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-7)
            assert_close64(out, ref_batch(name, logratios, rewards, 0.1, alpha, mask)[0])
            out.sum().backward()
            ref_out.sum().backward()
            assert torch.isfinite(lr_g.grad).all()
            assert torch.all(lr_g.grad[~mask] == 0)
            torch.testing.assert_close(lr_g.grad, lr_c.grad, rtol=1e-6, atol=1e-7)
            p = reward_targets(rw_in, alpha, mask=mask)
            assert torch.isfinite(p).all()
            assert torch.all(p[~mask] == 0)
            torch.testing.assert_close(p, reward_targets(clean_rw, alpha, mask=mask), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ragged_batch_equals_rows_alone(name, seed):
    logratios, rewards, mask = random_batch(seed)
    fn = LOSS_FN[name]
    for alpha in (0, 1.0):
        lr = logratios.clone().requires_grad_(True)
        batch = fn(lr, rewards, beta=0.1, alpha=alpha, mask=mask)
        batch.sum().backward()
        for b in range(logratios.shape[0]):
            idx = mask[b].nonzero().flatten()
            lr_b = logratios[b, idx][None].clone().requires_grad_(True)
            alone = fn(lr_b, rewards[b, idx][None], beta=0.1, alpha=alpha)
            torch.testing.assert_close(batch[b : b + 1], alone, rtol=1e-6, atol=1e-7)
            alone.sum().backward()
            torch.testing.assert_close(lr.grad[b, idx], lr_b.grad[0], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["infonca", "nca"])
@pytest.mark.parametrize("alpha", [0, 0.5])
def test_gradient_analytic(name, alpha):
    # InfoNCA: dL/dg_i = softmax(g)_i - p_i ; NCA: dL/dg_i = -p_i sigmoid(-g_i) + sigmoid(g_i) / K
    beta = 0.3
    logratios = _t([[2.0, -1.0, 0.5, 4.0], [1.0, 3.0, -2.0, 0.0]])
    rewards = _t([[1.0, 3.0, 3.0, -1.0], [0.0, 1.0, 2.0, 9.0]])
    mask = _t([[True, True, True, True], [True, True, True, False]], torch.bool)
    lr = logratios.clone().requires_grad_(True)
    LOSS_FN[name](lr, rewards, beta=beta, alpha=alpha, mask=mask).sum().backward()
    g = beta * logratios.double()
    p = ref_targets_batch(rewards, alpha, mask)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for b in range(2):
        idx = mask[b].nonzero().flatten()
        gb, pb = g[b, idx], p[b, idx]
        if name == "infonca":
            dg = torch.exp(gb - torch.logsumexp(gb, 0)) - pb
        else:
            dg = -pb * torch.sigmoid(-gb) + torch.sigmoid(gb) / len(idx)
        expected[b, idx] = beta * dg
    assert_close64(lr.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_gradient_finite_differences_of_reference(name):
    logratios, rewards, mask = random_batch(3)
    beta, alpha = 0.5, 1.0
    lr = logratios.clone().requires_grad_(True)
    LOSS_FN[name](lr, rewards, beta=beta, alpha=alpha, mask=mask).sum().backward()
    h = 1e-5
    fd = torch.zeros_like(logratios, dtype=torch.float64)
    base = logratios.double()
    for b in range(base.shape[0]):
        for i in range(base.shape[1]):
            if not mask[b, i]:
                continue
            up, dn = base.clone(), base.clone()
            up[b, i] += h
            dn[b, i] -= h
            fd[b, i] = (ref_batch(name, up, rewards, beta, alpha, mask)[0].sum()
                        - ref_batch(name, dn, rewards, beta, alpha, mask)[0].sum()) / (2 * h)
    assert_close64(lr.grad, fd, rtol=1e-4, atol=1e-6)


def test_gradients_flow_only_to_logratios_requiring_grad():
    logratios = torch.randn(2, 3, requires_grad=True)
    rewards = torch.randn(2, 3)
    for fn in (nca_loss, infonca_loss):
        out = fn(logratios, rewards, beta=0.1, alpha=1.0)
        assert out.requires_grad
        (grad,) = torch.autograd.grad(out.mean(), logratios)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

LR = torch.zeros(2, 3)
RW = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.5]])


@pytest.mark.parametrize("fn", [nca_loss, infonca_loss])
@pytest.mark.parametrize("alpha", [-1e-9, -0.1, -5])
def test_error_negative_alpha(fn, alpha):
    with pytest.raises(ValueError, match="(?i)alpha"):
        fn(LR, RW, beta=0.1, alpha=alpha)


@pytest.mark.parametrize("alpha", [-1e-9, -1.0])
def test_error_reward_targets_negative_alpha(alpha):
    with pytest.raises(ValueError, match="(?i)alpha"):
        reward_targets(RW, alpha)


@pytest.mark.parametrize("fn", [nca_loss, infonca_loss])
@pytest.mark.parametrize("beta", [0, 0.0, -0.1])
def test_error_nonpositive_beta(fn, beta):
    with pytest.raises(ValueError, match="(?i)beta"):
        fn(LR, RW, beta=beta, alpha=1.0)


@pytest.mark.parametrize("fn", [nca_loss, infonca_loss])
def test_error_shape_mismatch_logratios_rewards(fn):
    with pytest.raises(ValueError, match="(?i)shape"):
        fn(torch.zeros(2, 3), torch.zeros(2, 4), beta=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="(?i)shape"):
        fn(torch.zeros(3, 3), torch.zeros(2, 3), beta=0.1, alpha=1.0)


@pytest.mark.parametrize("fn", [nca_loss, infonca_loss])
def test_error_mask_shape(fn):
    with pytest.raises(ValueError, match="(?i)shape"):
        fn(LR, RW, beta=0.1, alpha=1.0, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="(?i)shape"):
        fn(LR, RW, beta=0.1, alpha=1.0, mask=torch.ones(3, dtype=torch.bool))


def test_error_reward_targets_mask_shape():
    with pytest.raises(ValueError, match="(?i)shape"):
        reward_targets(RW, 1.0, mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("fn", [nca_loss, infonca_loss])
def test_error_fewer_than_two_valid(fn):
    one_valid = torch.tensor([[True, True, True], [False, True, False]])
    with pytest.raises(ValueError, match="(?i)(2|two)"):
        fn(LR, RW, beta=0.1, alpha=1.0, mask=one_valid)
    none_valid = torch.tensor([[True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match="(?i)(2|two)"):
        fn(LR, RW, beta=0.1, alpha=0, mask=none_valid)
    # K = 1 without a mask
    with pytest.raises(ValueError, match="(?i)(2|two)"):
        fn(torch.zeros(2, 1), torch.zeros(2, 1), beta=0.1, alpha=1.0)


# --------------------------------------------------------------------------------------------
# Per-row alpha: preference pairs (alpha 0, one-hot) and rated rows (alpha > 0) in one batch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [nca_loss, infonca_loss])
def test_per_row_alpha_equals_each_row_alone(loss_fn):
    torch.manual_seed(0)
    logratios, rewards = torch.randn(4, 3), torch.randn(4, 3)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False], [True, True, True]])
    alpha = torch.tensor([0.0, 0.7, 0.0, 2.0])
    batched = loss_fn(logratios, rewards, beta=0.5, alpha=alpha, mask=mask)
    for b in range(4):
        alone = loss_fn(logratios[b : b + 1], rewards[b : b + 1], beta=0.5, alpha=float(alpha[b]), mask=mask[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-6)
    # A pair's loss does not move with alpha (one-hot), a rated row's does
    other = loss_fn(logratios, rewards, beta=0.5, alpha=torch.tensor([0.0, 5.0, 0.0, 0.01]), mask=mask)
    assert torch.equal(other[[0, 2]], batched[[0, 2]]) and not torch.allclose(other[[1, 3]], batched[[1, 3]])
    # Gradients flow through the per-row targets' rows only where they should: finite everywhere
    lr = logratios.clone().requires_grad_(True)
    loss_fn(lr, rewards, beta=0.5, alpha=alpha, mask=mask).sum().backward()
    assert torch.isfinite(lr.grad).all()


def test_per_row_alpha_targets_and_checks():
    p = reward_targets(_t([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(p, _t([[1.0, 0.0], [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        reward_targets(_t([[1.0, 0.0]]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        reward_targets(_t([[1.0, 0.0]]), torch.tensor([-1.0]))


@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_alpha_inf_is_the_uniform_limit_on_prompts_of_different_k(name):
    """`alpha=inf` (allowed: the uniform limit) gave NaN targets for a prompt with fewer completions than its batch's
    largest (its padded slots: -inf / inf), which stopped training at step 1 as a non-finite loss of the user's rows."""
    rewards = _t([[3.0, 3.0, 1.0, 0.0], [2.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    assert torch.equal(reward_targets(rewards, math.inf, mask), _t([[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]))
    logratios = _t([[0.7, -1.3, 2.1, 0.05], [0.4, -0.2, 0.0, 0.0]])
    batch = LOSS_FN[name](logratios, rewards, 0.5, math.inf, mask)
    alone = LOSS_FN[name](logratios[1:, :2], rewards[1:, :2], 0.5, math.inf)
    assert torch.isfinite(batch).all() and batch[1].item() == pytest.approx(alone.item(), rel=1e-6)
    equal = LOSS_FN[name](logratios[1:, :2], _t([[1.0, 1.0]]), 0.5, 1.0)  # tied rewards: uniform at any alpha
    assert alone.item() == pytest.approx(equal.item(), rel=1e-6)
