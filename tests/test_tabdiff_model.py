"""TabDiff's model math against closed forms and a direct computation: the per-column schedules,
the gumbel soft corruption, SUBS and the mixed loss, and the quantile transform against sklearn."""

import numpy as np
import pytest
import torch

from diffkern.tabdiff.config import TabDiffConfig
from diffkern.tabdiff.diffusion import MaskingSchedule, PowerMeanSchedule, TabDiffModel, soft_corrupt, subs_log_prob
from diffkern.tabdiff import transforms

K = [3, 2]


def test_power_mean_schedule_closed_form():
    sched = PowerMeanSchedule(3, sigma_min=0.002, sigma_max=80.0)
    with torch.no_grad():
        sched.rho_raw.copy_(torch.tensor([-2.0, 0.0, 3.0]))
    rho = torch.nn.functional.softplus(sched.rho_raw) + 5.0
    torch.testing.assert_close(sched.rho(), rho)
    t = torch.tensor([[0.0], [0.3], [1.0]], dtype=torch.float64)
    expect = (0.002 ** (1 / rho.double()) + t * (80.0 ** (1 / rho.double()) - 0.002 ** (1 / rho.double()))) ** rho.double()
    torch.testing.assert_close(sched.total_noise(t), expect)
    torch.testing.assert_close(sched.total_noise(t)[0], torch.full((3,), 0.002, dtype=torch.float64))
    torch.testing.assert_close(sched.total_noise(t)[2], torch.full((3,), 80.0, dtype=torch.float64))
    torch.testing.assert_close(sched.inverse_to_t(sched.total_noise(t)), t.expand(3, 3))
    fixed = PowerMeanSchedule(2, fixed_rho=[7.0, 9.0])
    assert fixed.rho().tolist() == [7.0, 9.0] and not fixed.rho_raw.requires_grad


def test_masking_schedule_closed_form_and_rate():
    sched = MaskingSchedule(2, eps_max=1e-3, eps_min=1e-5)
    with torch.no_grad():
        sched.k_raw.copy_(torch.tensor([0.0, 1.5]))
    k = (torch.nn.functional.softplus(sched.k_raw) + 1.0).double()
    t = torch.tensor([[0.05], [0.5], [0.99]], dtype=torch.float64, requires_grad=True)
    sigma = sched.total_noise(t)
    move = 1e-5 + (1 - 1e-3 - 1e-5) * t.detach() ** k
    torch.testing.assert_close(sigma.detach(), -torch.log1p(-move))
    # rate_noise is d sigma / dt (autograd of the closed form)
    rate = torch.stack([torch.autograd.grad(sigma[:, j].sum(), t, retain_graph=True)[0][:, 0] for j in range(2)], 1)
    torch.testing.assert_close(sched.rate_noise(t.detach()), rate)


def test_soft_corrupt_masks_at_the_rate_and_passes_gradients():
    B = 20_000
    x_cat = torch.stack([torch.randint(0, k, (B,), generator=torch.Generator().manual_seed(j)) for j, k in enumerate(K)], 1)
    move = torch.tensor([[0.2, 0.7]]).expand(B, 2).clone().requires_grad_(True)
    x_t, onehot = soft_corrupt(x_cat, move, K, torch.Generator().manual_seed(0))
    masked = x_t == torch.tensor(K)
    rate = masked.double().mean(0)
    sd = (torch.tensor([0.2 * 0.8, 0.7 * 0.3]) / B).sqrt()
    assert bool(((rate - torch.tensor([0.2, 0.7])).abs() < 5 * sd).all()), rate
    assert torch.equal(x_t[~masked], x_cat[~masked])
    # one-hot: exactly one slot per segment, the MASK slot where masked
    seg = [onehot[:, 0:4], onehot[:, 4:7]]
    for j, s in enumerate(seg):
        torch.testing.assert_close(s.sum(1), torch.ones(B))
        torch.testing.assert_close(s[:, -1], masked[:, j].float())
    onehot[:, 3].sum().backward()                       # gradients reach the masking probability
    assert move.grad is not None and float(move.grad.abs().sum()) > 0


def test_subs_log_prob_removes_the_mask_logit():
    logits = torch.randn(5, sum(K) + len(K))
    target = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0], [2, 1]])
    out = subs_log_prob(logits, K, target)
    for b in range(5):
        assert torch.isclose(out[b, 0], torch.log_softmax(logits[b, 0:3], 0)[target[b, 0]])
        assert torch.isclose(out[b, 1], torch.log_softmax(logits[b, 4:6], 0)[target[b, 1]])


def test_loss_matches_direct_computation():
    cfg = TabDiffConfig(dim_t=16, ffn_factor=2)
    torch.manual_seed(0)
    model = TabDiffModel(2, K, cfg.network_kwargs(), cfg.schedule_kwargs())
    B = 64
    g0 = torch.Generator().manual_seed(1)
    x_num = torch.randn(B, 2, generator=g0)
    x_cat = torch.stack([torch.randint(0, k, (B,), generator=g0) for k in K], 1)
    d_loss, c_loss = model.loss(x_num, x_cat, generator=torch.Generator().manual_seed(7))

    # replay the three random draws of the loss: t, the Gaussian noise, the gumbel exponentials
    g = torch.Generator().manual_seed(7)
    t = torch.rand(B, 1, generator=g)
    eps = torch.randn(B, 2, generator=g)
    expo = torch.empty(B, 2, 2).exponential_(generator=g)
    rho = model.num_schedule.rho().detach()
    lo, hi = 0.002 ** (1 / rho), 80.0 ** (1 / rho)
    sigma = (lo + t * (hi - lo)) ** rho
    kk = model.cat_schedule.k().detach()
    move = 1e-5 + (1 - 1e-3 - 1e-5) * t ** kk
    masked = torch.log(move) - torch.log(expo[..., 1]) > torch.log1p(-move) - torch.log(expo[..., 0])
    onehot = torch.zeros(B, 7)
    for j, (off, k) in enumerate(zip([0, 4], K)):
        onehot[torch.arange(B), torch.where(masked[:, j], off + k, off + x_cat[:, j])] = 1.0
    with torch.no_grad():
        D, logits = model.network(x_num + eps * sigma, onehot, t.squeeze(1), sigma)
        c_direct = (((sigma ** 2 + 1) / sigma ** 2) * (D - x_num) ** 2).mean()
        alpha = (1 - move)                                            # exp(-sigma_cat)
        dmove = (1 - 1e-3 - 1e-5) * kk * t ** (kk - 1)
        weight = dmove / alpha / (1 / alpha - 1)                      # -alpha'/(1 - alpha)
        logp = torch.stack([torch.log_softmax(logits[:, off:off + k], -1).gather(1, x_cat[:, j:j + 1])[:, 0]
                            for j, (off, k) in enumerate(zip([0, 4], K))], 1)
        d_direct = (-weight * logp * masked).mean()
    torch.testing.assert_close(c_loss.detach(), c_direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_loss.detach(), d_direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("values", [np.random.default_rng(0).normal(size=500),
                                    np.r_[np.zeros(200), np.random.default_rng(1).exponential(size=300)],
                                    np.random.default_rng(2).integers(0, 5, 50).astype(float)])
def test_quantile_transform_matches_sklearn(values):
    pre = pytest.importorskip("sklearn.preprocessing")
    sk = pre.QuantileTransformer(output_distribution="normal", n_quantiles=max(min(len(values) // 30, 1000), 10),
                                 subsample=10**9, random_state=0).fit(values[:, None])
    q = transforms.fit_quantiles(values)
    np.testing.assert_allclose(q, sk.quantiles_[:, 0], rtol=1e-12, atol=1e-12)
    probe = np.r_[values[:50], values.min() - 1, values.max() + 1]
    z = transforms.quantile_forward(probe, q)
    np.testing.assert_allclose(z, sk.transform(probe[:, None])[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(transforms.quantile_inverse(z, q), sk.inverse_transform(z[:, None])[:, 0],
                               rtol=1e-6, atol=1e-6)
