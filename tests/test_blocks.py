"""The batched DT blocks against T separately built blocks, and the gradient routing of NoProp.

(a) `DenoisingBlocks` (stacked parameters, one computation for all T blocks) computes what T plain
    PyTorch blocks (`models.separate.DTBlock`) with the same weights compute: outputs, every
    parameter's gradient slice, the gradients w.r.t. x, z and W_embed, and the running statistics,
    in train mode (batch statistics) and eval mode (running statistics after a train-mode update),
    for the three embedding kinds over typical and odd image shapes, T, N and m.
(b) A `blocks=` slice runs exactly those blocks: same output and gradients as the separate
    blocks, exactly zero gradient and untouched running statistics for every other block.
(c) No gradient crosses blocks: block t's loss term gives every other block's slice of every
    block parameter an exactly zero gradient, the classifier none; the CE term gives the blocks
    none; W_embed (learned, prototype) gets gradient from the block terms and from CE.
(d) The backprop baseline, by contrast, sends the CE gradient into the first block.
(e) The conv tower's CPU dropout keeps each value with probability 1 - p, scales it by 1 / (1 - p)
    and sends the gradient through the same mask.

Dropout is 0 wherever two forms are compared (its masks are random); (c) keeps it on, since
isolation must hold with it.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from noprop_fast.layers import BlockBatchNorm, block_parameters
from noprop_fast.noprop import backprop_loss, noprop_loss
from noprop_fast.models.image import (ClassEmbedding, ConvTower, DenoisingBlocks, ImageModel,
                                      _UniformDropout)
from noprop_fast.models.separate import DTBlock, batched_from_separate, separate_blocks_from
from noprop_fast.ops.reference import block_loss, noisy_latents
from noprop_fast.schedule import NoiseSchedule, prior_kl

# batched vs separate: |actual - expected| <= atol * scale + rtol * |expected|, elementwise, where
# scale is the largest magnitude in the tensor's group: the output for the output, the largest of
# all gradients of the pass for a gradient. A per-pass scale, because many gradients are exactly
# zero in exact arithmetic (a bias that feeds a train-mode BatchNorm through a linear layer has
# none) and come out as rounding noise the size of the pass's large gradients times eps.
# Measured (scale-relative): float64 worst 5e-15 over 600 random passes of the hypothesis space;
# float32 2.4e-7 on the fixed N = 7 case. Running statistics compare with scale 1.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}
# sum of per-term gradients vs the gradient of noprop_loss's total (float32, same ops reordered)
SUM_OF_TERMS_TOLERANCE = dict(rtol=1e-5, atol=1e-7)

KINDS = ("onehot", "learned", "prototype")
IMAGE_SHAPES = [(1, 4, 4), (1, 8, 8), (3, 8, 8), (1, 7, 9), (2, 5, 6)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are far too small to gain from intra-op threads, and with another process on
    the CPU, OpenMP's waiting threads made this file ~100x slower (3 s instead of 30 ms a pass)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- building both forms


def embed_dim_for(kind: str, num_classes: int, image_shape, learned_dim: int) -> int:
    return {"onehot": num_classes, "learned": learned_dim,
            "prototype": image_shape[0] * image_shape[1] * image_shape[2]}[kind]


def make_blocks(num_blocks, image_shape, num_classes, kind, learned_dim=20, dtype=torch.float64,
                seed=0, dropout=0.0):
    """DenoisingBlocks with every BatchNorm's affine parameters and running statistics drawn at
    random per (block, channel), so that a slice mix-up cannot hide behind ones and zeros.
    Returns (blocks, W_embed [m, d])."""
    torch.manual_seed(seed)
    d = embed_dim_for(kind, num_classes, image_shape, learned_dim)
    latent_shape = image_shape if kind == "prototype" else None
    batched = DenoisingBlocks(num_blocks, image_shape, num_classes, d, dropout, latent_shape)
    with torch.no_grad():
        for module in batched.modules():
            if isinstance(module, BlockBatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    if kind == "onehot":
        embed_weight = torch.eye(num_classes)
    elif kind == "learned":
        embed_weight = torch.nn.init.orthogonal_(torch.empty(num_classes, d))
    else:
        embed_weight = torch.rand(num_classes, d)  # image-like prototypes
    return batched.to(dtype), embed_weight.to(dtype)


def make_inputs(num_blocks, batch, image_shape, d, dtype, seed=1):
    """Images x [N, C, H, W], latents z [T, N, d], and a random probe [T, N, d]: the tests
    backpropagate sum(u_hat * probe), since sum(u_hat) has zero gradient for one-hot W_embed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *image_shape, generator=gen, dtype=dtype)
    z = torch.randn(num_blocks, batch, d, generator=gen, dtype=dtype)
    probe = torch.randn(num_blocks, batch, d, generator=gen, dtype=dtype)
    return x, z, probe


@dataclass
class Pass:
    output: torch.Tensor         # [B, N, d]
    param_grads: dict            # parameter name -> gradient [T, ...] (batched: the full tensor)
    input_grads: dict            # "x", "z", "embed_weight" -> gradient


def run_batched(batched: DenoisingBlocks, x, z, embed_weight, probe, blocks=slice(None)) -> Pass:
    x, z, w = (v.clone().requires_grad_() for v in (x, z, embed_weight))
    batched.zero_grad(set_to_none=True)
    output = batched(x, z[blocks], w, blocks)
    (output * probe[blocks]).sum().backward()
    grads = {name: p.grad.clone() for name, p in batched.named_parameters()}
    return Pass(output.detach(), grads, {"x": x.grad, "z": z.grad, "embed_weight": w.grad})


def run_separate(separate, x, z, embed_weight, probe, blocks=slice(None)) -> Pass:
    """Blocks in the slice one after another, their losses summed; gradients stacked [B, ...]."""
    x, z, w = (v.clone().requires_grad_() for v in (x, z, embed_weight))
    indices = range(len(separate))[blocks]
    for t in indices:
        separate[t].zero_grad(set_to_none=True)
    output = torch.stack([separate[t](x, z[t], w) for t in indices])
    (output * probe[blocks]).sum().backward()
    names = [name for name, _ in separate[0].named_parameters()]
    grads = {name: torch.stack([separate[t].get_parameter(name).grad for t in indices])
             for name in names}
    return Pass(output.detach(), grads, {"x": x.grad, "z": z.grad, "embed_weight": w.grad})


def assert_close_scaled(actual, expected, tol, scale, name):
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{name}: {m}")


def assert_same_pass(batched: Pass, separate: Pass, tol, blocks=slice(None)):
    """Same output and gradients; `separate` is the reference (see TOLERANCES for the scales)."""
    assert_close_scaled(batched.output, separate.output, tol, separate.output.abs().max(), "output")
    assert batched.param_grads.keys() == separate.param_grads.keys()
    expected = dict(separate.param_grads, **separate.input_grads)
    grad_scale = max(g.abs().max() for g in expected.values())
    for name, grad in batched.param_grads.items():
        assert_close_scaled(grad[blocks], expected[name], tol, grad_scale, name)
    for name, grad in batched.input_grads.items():
        assert_close_scaled(grad, expected[name], tol, grad_scale, name)


def assert_same_buffers(batched: DenoisingBlocks, separate, tol):
    for name, buffer in batched.named_buffers():
        for t, block in enumerate(separate):
            torch.testing.assert_close(buffer[t], block.get_buffer(name), **tol, msg=f"{name}[{t}]")


def check_batched_matches_separate(num_blocks, image_shape, batch, num_classes, kind,
                                   learned_dim=20, dtype=torch.float64, seed=0):
    tol = TOLERANCES[dtype]
    batched, embed_weight = make_blocks(num_blocks, image_shape, num_classes, kind, learned_dim,
                                        dtype, seed)
    separate = separate_blocks_from(batched)
    d = embed_weight.shape[1]
    x, z, probe = make_inputs(num_blocks, batch, image_shape, d, dtype, seed + 1)
    running_before = {n: b.clone() for n, b in batched.named_buffers()}

    # train mode: batch statistics, and both forms update their running statistics
    batched.train(), separate.train()
    assert_same_pass(run_batched(batched, x, z, embed_weight, probe),
                     run_separate(separate, x, z, embed_weight, probe), tol)
    assert_same_buffers(batched, separate, tol)
    for name, buffer in batched.named_buffers():
        assert not torch.equal(buffer, running_before[name]), f"{name} was not updated"

    # eval mode: the running statistics just updated
    batched.eval(), separate.eval()
    assert_same_pass(run_batched(batched, x, z, embed_weight, probe),
                     run_separate(separate, x, z, embed_weight, probe), tol)


# ---------------------------------------------------------------- (a) batched == separate


def test_separate_blocks_are_exact_copies_and_the_conversion_goes_both_ways():
    batched, embed_weight = make_blocks(3, (2, 5, 6), 3, "learned", learned_dim=5)
    separate = separate_blocks_from(batched)
    assert len(separate) == 3 and all(isinstance(b, DTBlock) for b in separate)
    for key, value in batched.state_dict().items():
        for t, block in enumerate(separate):
            copy = block.state_dict()[key]
            assert torch.equal(copy, value[t]) and copy.data_ptr() != value[t].data_ptr(), key
    stacked, original = batched_from_separate(separate), batched.state_dict()
    assert stacked.keys() == original.keys()
    assert all(torch.equal(stacked[key], original[key]) for key in original)

    # change the separate blocks differently, load them back, and the two forms agree again
    with torch.no_grad():
        for t, block in enumerate(separate):
            for p in block.parameters():
                p.add_(0.01 * (t + 1) * torch.randn_like(p))
            for name, buffer in block.named_buffers():
                if name.endswith("running_var"):
                    buffer.mul_(1.0 + 0.1 * t)
    restored = DenoisingBlocks(3, (2, 5, 6), 3, 5, dropout=0.0).double()
    restored.load_state_dict(batched_from_separate(separate))
    assert not torch.equal(restored.head.weight, batched.head.weight)
    x, z, probe = make_inputs(3, 4, (2, 5, 6), 5, torch.float64)
    restored.eval(), separate.eval()
    assert_same_pass(run_batched(restored, x, z, embed_weight, probe),
                     run_separate(separate, x, z, embed_weight, probe), TOLERANCES[torch.float64])


@pytest.mark.parametrize("num_blocks, image_shape, batch, num_classes, kind, dtype", [
    (3, (1, 8, 8), 3, 10, "onehot", torch.float64),
    (3, (1, 8, 8), 3, 10, "learned", torch.float64),     # learned: d = 20, as in the paper
    (3, (1, 8, 8), 3, 10, "prototype", torch.float64),
    (1, (2, 5, 6), 2, 2, "prototype", torch.float64),
    (5, (1, 7, 9), 7, 3, "onehot", torch.float64),
    (2, (3, 8, 8), 7, 10, "learned", torch.float32),
])
def test_batched_matches_separate_blocks(num_blocks, image_shape, batch, num_classes, kind, dtype):
    check_batched_matches_separate(num_blocks, image_shape, batch, num_classes, kind, dtype=dtype)


@settings(max_examples=15, deadline=None)
@given(num_blocks=st.sampled_from([1, 2, 3, 5]), image_shape=st.sampled_from(IMAGE_SHAPES),
       batch=st.sampled_from([2, 3, 7]), num_classes=st.sampled_from([2, 3, 10]),
       kind=st.sampled_from(KINDS), learned_dim=st.sampled_from([2, 7, 20]),
       seed=st.integers(0, 2**16))
def test_batched_matches_separate_blocks_over_shapes(num_blocks, image_shape, batch, num_classes,
                                                     kind, learned_dim, seed):
    """A learned d = 1 is left out: one number per example through FC -> BatchNorm over N = 2 rows
    is ill-conditioned enough (float64 differences up to 2.4e-10 of the scale, where d >= 2 stays
    below 1e-14) that it would test rounding rather than the stacked layout."""
    check_batched_matches_separate(num_blocks, image_shape, batch, num_classes, kind, learned_dim,
                                   torch.float64, seed)


# ---------------------------------------------------------------- (b) block slices


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocks", [slice(0, 1), slice(3, 4), slice(1, 3)], ids=str)
def test_block_slice_runs_exactly_those_blocks(kind, blocks):
    num_blocks, image_shape, batch = 4, (1, 7, 9), 3
    tol = TOLERANCES[torch.float64]
    batched, embed_weight = make_blocks(num_blocks, image_shape, 3, kind, learned_dim=6)
    separate = separate_blocks_from(batched)
    x, z, probe = make_inputs(num_blocks, batch, image_shape, embed_weight.shape[1], torch.float64)
    inside = torch.zeros(num_blocks, dtype=torch.bool)
    inside[blocks] = True

    for train in (True, False):
        batched.train(train), separate.train(train)
        running_before = {n: b.clone() for n, b in batched.named_buffers()}
        result = run_batched(batched, x, z, embed_weight, probe, blocks)
        assert_same_pass(result, run_separate(separate, x, z, embed_weight, probe, blocks), tol,
                         blocks)
        for name, grad in result.param_grads.items():
            assert torch.equal(grad[~inside], torch.zeros_like(grad[~inside])), name
        for name, buffer in batched.named_buffers():
            assert torch.equal(buffer[~inside], running_before[name][~inside]), name
            assert torch.equal(buffer[inside], running_before[name][inside]) != train, name
        assert_same_buffers(batched, separate, tol)

    # inference (eval mode) computes every block's image features once, then denoises one by one
    with torch.no_grad():
        features = batched.image_features(x)[blocks]
        via_all_blocks = batched.denoise(features, z[blocks], embed_weight, blocks)
    assert_close_scaled(via_all_blocks, result.output, tol, result.output.abs().max(), "output")


# ---------------------------------------------------------------- (c) no gradient crosses blocks


def gradients(term, params):
    """d term / d params, an exact zero tensor where a parameter is not in the term's graph
    (a term may reach none: the KL term with a fixed one-hot W_embed is a constant)."""
    if not term.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def is_zero(tensor) -> bool:
    return torch.equal(tensor, torch.zeros_like(tensor))


def assert_only_block_gets_gradient(params, grads, t):
    """Every other block's slice exactly zero; block t's slices not all zero."""
    own = 0.0
    for p, g in zip(params, grads):
        others = torch.cat([g[:t], g[t + 1:]])
        assert is_zero(others), f"block {t}'s term reached another block ({list(p.shape)})"
        own += g[t].abs().sum().item()
    assert own > 0, f"block {t}'s term gave its own block no gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_block_losses_reach_only_their_own_block(kind):
    num_blocks, image_shape, batch = 3, (2, 5, 6), 4
    batched, embed_weight = make_blocks(num_blocks, image_shape, 3, kind, learned_dim=5,
                                        dtype=torch.float32, dropout=0.2)
    batched.train()
    x, z, _ = make_inputs(num_blocks, batch, image_shape, embed_weight.shape[1], torch.float32)
    embed_weight.requires_grad_(kind != "onehot")
    u = embed_weight[torch.tensor([0, 1, 2, 1])]
    per_block = block_loss(batched(x, z, embed_weight), u, torch.ones(num_blocks))   # [T]
    params = list(batched.parameters())
    assert len(params) == len(block_parameters(batched))
    for t in range(num_blocks):
        assert_only_block_gets_gradient(params, gradients(per_block[t], params), t)
        if kind != "onehot":
            (w_grad,) = gradients(per_block[t], [embed_weight])
            assert not is_zero(w_grad)


def noprop_terms(model: ImageModel, schedule: NoiseSchedule, x, y) -> dict:
    """`methods.noprop_loss` (all blocks) split into its terms, built from the same public pieces
    and drawing the noise in the same order: weighted block terms [T], CE, KL."""
    u = model.embedding(y)
    features = model.blocks.image_features(x)
    noise = torch.randn(model.num_blocks, u.shape[0], u.shape[1], dtype=u.dtype)
    z = noisy_latents(u, schedule.input_scale, schedule.noise_scale, noise)
    u_hat = model.blocks.denoise(features, z, model.embedding.weight)
    blocks = block_loss(u_hat, u, schedule.snr_weights)
    abar_T = schedule.alpha_bar[-1:]
    z_clean = noisy_latents(u, abar_T.sqrt(), (1 - abar_T).sqrt(), torch.randn_like(u)[None])[0]
    ce = F.cross_entropy(model.classifier(z_clean), y)
    return {"blocks": blocks, "ce": ce, "kl": prior_kl(u, schedule)}


def make_image_model(method, kind, num_blocks=3, image_shape=(1, 8, 8), num_classes=4, seed=0):
    torch.manual_seed(seed)
    d = image_shape[0] * image_shape[1] * image_shape[2]
    prototypes = torch.rand(num_classes, d) if kind == "prototype" else None
    embedding = ClassEmbedding(kind, num_classes, dim=6, prototypes=prototypes)
    return ImageModel(method, num_blocks, image_shape, num_classes, embedding, dropout=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_noprop_loss_routes_each_term_to_its_own_parameters(kind):
    model = make_image_model("noprop", kind)
    schedule = NoiseSchedule.cosine(model.num_blocks)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    block_params = block_parameters(model.blocks)
    classifier = list(model.classifier.parameters())
    embedding = list(model.embedding.parameters())   # empty for one-hot (a fixed buffer)

    torch.manual_seed(7)
    loss, parts = noprop_loss(model, schedule, x, y)
    torch.manual_seed(7)
    terms = noprop_terms(model, schedule, x, y)
    # the split is noprop_loss itself: same total, same parts
    total = terms["blocks"].sum() + terms["ce"] + terms["kl"]
    torch.testing.assert_close(total, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["ce"], parts["ce"], rtol=1e-6, atol=0)

    params = block_params + classifier + embedding
    n_block, n_cls = len(block_params), len(classifier)
    term_grads = []
    for t in range(model.num_blocks):
        grads = gradients(terms["blocks"][t], params)
        assert_only_block_gets_gradient(block_params, grads[:n_block], t)
        classifier_grads = grads[n_block:n_block + n_cls]
        assert all(is_zero(g) for g in classifier_grads), "block term reached the classifier"
        assert all(not is_zero(g) for g in grads[n_block + n_cls:]), "block term missed W_embed"
        term_grads.append(grads)
    grads = gradients(terms["ce"], params)
    assert all(is_zero(g) for g in grads[:n_block]), "CE reached a block"
    assert all(not is_zero(g) for g in grads[n_block:]), "CE missed classifier or W_embed"
    term_grads.append(grads)
    grads = gradients(terms["kl"], params)
    assert all(is_zero(g) for g in grads[:n_block + n_cls]), "KL reached a block or the classifier"
    term_grads.append(grads)

    # and the total's gradient is the sum of the terms' gradients
    loss.backward()
    for i, p in enumerate(params):
        torch.testing.assert_close(p.grad, sum(g[i] for g in term_grads), **SUM_OF_TERMS_TOLERANCE)


@pytest.mark.parametrize("t", [0, 2])
def test_noprop_loss_on_one_block_trains_only_that_block(t):
    """The sequential schedule: noprop_loss(blocks=slice(t, t + 1)) moves block t alone."""
    model = make_image_model("noprop", "learned")
    schedule = NoiseSchedule.cosine(model.num_blocks)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    loss, _ = noprop_loss(model, schedule, x, y, blocks=slice(t, t + 1))
    loss.backward()
    params = block_parameters(model.blocks)
    assert_only_block_gets_gradient(params, [p.grad for p in params], t)
    assert not is_zero(model.embedding.weight.grad) and not is_zero(model.classifier.weight.grad)


# ---------------------------------------------------------------- (d) the backprop baseline


def test_backprop_baseline_sends_ce_gradient_into_the_first_block():
    """The contrast with (c): trained end to end, the CE at z_T reaches block 1 through the chain."""
    model = make_image_model("backprop", "learned")
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 1])
    torch.manual_seed(3)
    loss, _ = backprop_loss(model, x, y)
    loss.backward()
    first_block = {name: p.grad[0] for name, p in model.blocks.named_parameters()}
    for name in ("image_tower.conv1.weight", "latent_fc1.weight", "head.weight"):
        assert not is_zero(first_block[name]), f"{name}: no gradient reached block 1"
    assert not is_zero(model.mix_logits.grad[0])


def test_batchnorm_refuses_a_strided_block_slice():
    """A strided slice of the running-stat buffers is a copy: its update would be lost silently."""
    bn = BlockBatchNorm(3, 4)
    with pytest.raises(ValueError, match="contiguous block slice"):
        bn(torch.randn(2, 5, 4), slice(0, 3, 2))


@pytest.mark.parametrize("kind", ["onehot", "learned", "prototype"])
def test_classifier_starts_as_a_matched_filter_on_the_embeddings(kind):
    """classifier_init="embedding": z = u_y gives logit 1 for class y (one-hot: the identity)."""
    torch.manual_seed(0)
    shape, m = (1, 8, 8), 5
    prototypes = torch.randn(m, 64) if kind == "prototype" else None
    embedding = ClassEmbedding(kind, m, 20, prototypes)
    model = ImageModel("noprop", 2, shape, m, embedding)
    logits = model.classifier(embedding.weight)  # [m, m]: row y is the classifier on u_y
    torch.testing.assert_close(logits.diagonal(), torch.ones(m))
    if kind == "onehot":
        assert torch.equal(model.classifier.weight, torch.eye(m))
    random = ImageModel("noprop", 2, shape, m, embedding, classifier_init="random")
    assert not torch.allclose(random.classifier(embedding.weight).diagonal(), torch.ones(m))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_cpu_dropout_keeps_values_at_rate_one_minus_p_and_its_gradient_uses_the_same_mask(p):
    n = 1_000_000
    h = (torch.rand(n) + 0.5).requires_grad_()   # never 0: a zero output is a dropped value
    torch.manual_seed(3)
    out = _UniformDropout.apply(h, p)
    kept = out != 0
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma
    torch.testing.assert_close(out[kept], h.detach()[kept] / (1 - p))
    grad = torch.randn(n)
    out.backward(grad)
    torch.testing.assert_close(h.grad, torch.where(kept, grad / (1 - p), torch.zeros(())))
    torch.manual_seed(3)
    assert torch.equal(_UniformDropout.apply(h.detach(), p), out.detach())  # the seed fixes the mask


def test_conv_tower_drops_on_cpu_in_training_only():
    torch.manual_seed(0)
    tower = ConvTower(2, (1, 8, 8), dropout=0.5, shared_input=True)
    x = torch.randn(64, 1, 8, 8)
    h = torch.rand(64, 2 * 32, 8, 8) + 0.5
    dropped = tower._dropout(h)
    assert 0.4 < (dropped == 0).double().mean().item() < 0.6
    tower.eval()
    assert torch.equal(tower._dropout(h), h)
    torch.testing.assert_close(tower(x), tower(x))   # eval: deterministic


def _prototype_by_loops(points: torch.Tensor) -> int:
    """The index of the point of smallest median distance to the *other* points (lower median)."""
    n = points.shape[0]
    if n == 1:
        return 0
    medians = []
    for i in range(n):
        others = sorted((points[i] - points[j]).norm().item() for j in range(n) if j != i)
        medians.append(others[(len(others) - 1) // 2])
    return min(range(n), key=lambda i: (medians[i], i))


def test_prototype_is_the_image_of_smallest_median_distance_to_the_other_images():
    """Six points on a line where counting each point's zero distance to itself would pick the
    point at 18 (medians 16, 9, 4, 2, 4, 8); over the other points the median picks 20."""
    from noprop_fast.models.image import prototype_embeddings
    line = torch.tensor([0.0, 9, 16, 18, 20, 26])
    images = torch.stack([line, torch.zeros(6)], 1).reshape(6, 1, 1, 2)
    assert prototype_embeddings(images, torch.zeros(6, dtype=torch.long), 1)[0, 0].item() == 20.0
    assert _prototype_by_loops(images.reshape(6, -1)) == 4


@settings(deadline=None, max_examples=20)
@given(n=st.integers(1, 12), classes=st.integers(1, 3), chunk=st.integers(1, 5), seed=st.integers(0, 99))
def test_prototypes_match_a_loop_over_the_other_images(n, classes, chunk, seed):
    from noprop_fast.models.image import prototype_embeddings
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n * classes, 1, 2, 3, generator=g)
    labels = torch.arange(classes).repeat_interleave(n)
    protos = prototype_embeddings(images, labels, classes, chunk=chunk)
    for k in range(classes):
        members = images[labels == k].reshape(n, -1)
        assert torch.equal(protos[k], members[_prototype_by_loops(members)])
