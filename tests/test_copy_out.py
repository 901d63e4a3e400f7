"""Sections 2 (Networks) and 3 (Losses) of every numbered script copy out with torch alone: pasted
into a fresh file under `import torch, torch.nn as nn, torch.nn.functional as F, math`, they run,
and give what the script gives. Each test takes the text between the `# 2. Networks` and
`# 4. Data` banners, checks that it names nothing it does not define, executes it in a fresh
namespace, and runs every network forward and every loss against the script's own, with the
same weights and inputs."""
import ast
import builtins
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, load_script

PREAMBLE = {"torch": torch, "nn": nn, "F": F, "math": math}


def sections_2_and_3(name):
    lines = (ROOT / f"{name}.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 2. Networks"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# 4. Data"))
    assert any(line.startswith("# 3. Losses") for line in lines[start:end])
    return "\n".join(lines[start:end])


def free_names(code):
    """Names the code reads but neither defines nor gets from the preamble or the builtins."""
    tree, bound = ast.parse(code), set(PREAMBLE) | set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            raise AssertionError(f"line {node.lineno}: an import inside sections 2-3")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    loads = {n.id for n in ast.walk(tree)
             if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return sorted(loads - bound)


def pasted(name):
    code = sections_2_and_3(name)
    assert free_names(code) == []
    ns = dict(PREAMBLE)
    exec(compile(code, f"<{name} sections 2-3>", "exec"), ns)
    return ns


def twin(make, ns_make, seed=0):
    """The script's net and the pasted one, with the script's weights."""
    torch.manual_seed(seed)
    net, copy = make(), ns_make()
    copy.load_state_dict(net.state_dict())
    return net, copy


def same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return True
    assert torch.equal(a, b), (a, b)
    return True


def test_the_free_name_check_can_fail():
    assert free_names("def f(x):\n    return require(x)\n") == ["require"]
    assert free_names("def f(x):\n    return torch.relu(x)\n") == []
    with pytest.raises(AssertionError, match="import"):
        free_names("import common\n")


def test_01_stargan_v1():
    S, ns = load_script("01_stargan_v1"), pasted("01_stargan_v1")
    G, G2 = twin(lambda: S.Generator(8, 5, 2), lambda: ns["Generator"](8, 5, 2))
    D, D2 = twin(lambda: S.Discriminator(32, 8, 5, 3), lambda: ns["Discriminator"](32, 8, 5, 3))
    x, c = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 2, (4, 5)).float()
    alpha = torch.rand(4, 1, 1, 1)
    x_fake = G(x, c)
    same(x_fake, G2(x, c))
    (src, cls), (src2, cls2) = D(x), D2(x)
    same((src, cls), (src2, cls2))
    same(S.adv_loss_d(src, src), ns["adv_loss_d"](src2, src2))
    same(S.adv_loss_g(src), ns["adv_loss_g"](src2))
    same(S.gradient_penalty(D, x, x_fake, alpha), ns["gradient_penalty"](D2, x, x_fake, alpha))
    for multi in (True, False):
        same(S.cls_loss(cls, c, multi), ns["cls_loss"](cls2, c, multi))
    same(S.rec_loss(x, x_fake), ns["rec_loss"](x, x_fake))
    same(S.mask_label(c, 1, (5, 3)), ns["mask_label"](c, 1, (5, 3)))
    same(S.known_logits(cls, 0, (3, 2)), ns["known_logits"](cls2, 0, (3, 2)))
    cfg = S.Config(total_iters=100, decay_iters=50)
    assert S.lr_at(75, 1e-4, cfg) == ns["lr_at"](75, 1e-4, cfg) == pytest.approx(5e-5)


def test_02_stargan_v2():
    m, ns = load_script("02_stargan_v2"), pasted("02_stargan_v2")
    cfg = m.Config(img_size=32, dim_in=8, max_conv_dim=16, mapping_dim=16, num_domains=3,
                   lambda_reg=2.0, lambda_sty=3.0, lambda_cyc=4.0)
    kw = dict(G=((cfg.img_size, cfg.style_dim, cfg.max_conv_dim, cfg.w_hpf, cfg.dim_in),
                 "Generator"),
              mapping=((cfg.latent_dim, cfg.style_dim, cfg.num_domains, cfg.mapping_dim),
                       "MappingNetwork"),
              E=((cfg.img_size, cfg.style_dim, cfg.num_domains, cfg.max_conv_dim, cfg.dim_in),
                 "StyleEncoder"),
              D=((cfg.img_size, cfg.num_domains, cfg.max_conv_dim, cfg.dim_in), "Discriminator"))
    pairs = {k: twin(lambda: m.he_init(getattr(m, cls)(*a)), lambda: ns["he_init"](ns[cls](*a)))
             for k, (a, cls) in kw.items()}
    nets, nets2 = (SimpleNamespace(**{k: p[i] for k, p in pairs.items()}) for i in (0, 1))
    g = torch.Generator().manual_seed(1)
    x, x_ref, x_ref2 = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in "abc")
    y_org, y_trg = torch.tensor([0, 1]), torch.tensor([2, 0])
    z_trgs = torch.randn(2, 2, cfg.latent_dim, generator=g)
    for style in (dict(z_trg=z_trgs[0]), dict(x_ref=x_ref)):
        same(m.d_loss(nets, cfg, x, y_org, y_trg, **style)[0],
             ns["d_loss"](nets2, cfg, x, y_org, y_trg, **style)[0])
    for style in (dict(z_trgs=z_trgs), dict(x_refs=(x_ref, x_ref2))):
        loss, terms = m.g_loss(nets, cfg, 0.5, x, y_org, y_trg, **style)
        loss2, terms2 = ns["g_loss"](nets2, cfg, 0.5, x, y_org, y_trg, **style)
        same(loss, loss2)
        same(list(terms.values()), list(terms2.values()))
    assert ns["lambda_ds_at"](5, dataclasses.replace(cfg, ds_iter=10)) == cfg.lambda_ds * 0.5


def test_03_bicyclegan_latent():
    bg, ns = load_script("03_bicyclegan_latent"), pasted("03_bicyclegan_latent")
    G, G2 = twin(lambda: bg.Generator(ngf=4, img_size=64),
                 lambda: ns["Generator"](ngf=4, img_size=64))
    E, E2 = twin(lambda: bg.Encoder(nef=4, img_size=64), lambda: ns["Encoder"](nef=4, img_size=64))
    D, D2 = twin(lambda: bg.MultiScaleD(ndf=4), lambda: ns["MultiScaleD"](ndf=4))
    A, B, z = torch.rand(2, 1, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 8)
    masks = G.dropout_masks(2, 64, 64)
    same(G(A, z, masks), G2(A, z, masks))  # train mode: the step's dropout masks
    same(G.eval()(A, z), G2.eval()(A, z))
    (mu, logvar), (mu2, logvar2) = E(B), E2(B)
    same((mu, logvar), (mu2, logvar2))
    same(D(B), D2(B))
    same(bg.lsgan_loss(D(B), 1.0), ns["lsgan_loss"](D2(B), 1.0))
    same(bg.kl_loss(mu, logvar), ns["kl_loss"](mu2, logvar2))
    same(bg.l1_loss(B, A.expand(-1, 3, -1, -1)), ns["l1_loss"](B, A.expand(-1, 3, -1, -1)))


def test_04_stylegan_mapping():
    sg, ns = load_script("04_stylegan_mapping"), pasted("04_stylegan_mapping")
    cfg = sg.Config(img_size=16, w_dim=8, mapping_layers=2, fmap_base=32, fmap_max=8)
    G, G2 = twin(lambda: sg.Generator(cfg), lambda: ns["Generator"](cfg))
    args = (cfg.img_size, cfg.fmap_base, cfg.fmap_max)
    D, D2 = twin(lambda: sg.Discriminator(*args), lambda: ns["Discriminator"](*args))
    z, z2 = torch.randn(4, 8), torch.randn(4, 8)
    noise = G.synthesis.make_noise(4, "cpu")
    ws, w = G.mixed_styles(z, z2, 2)
    same((ws, w), G2.mixed_styles(z, z2, 2))
    x = G.synthesis(ws, noise)
    same(x, G2.synthesis(ws, noise))
    same(G(z, 0.5, 2, noise), G2(z, 0.5, 2, noise))  # truncation toward w̄
    logits, logits2 = D(x), D2(x)
    same(logits, logits2)
    same(sg.d_logistic(logits, -logits), ns["d_logistic"](logits2, -logits2))
    same(sg.g_nonsaturating(logits), ns["g_nonsaturating"](logits2))
    x_real = x.detach().requires_grad_(True)
    same(sg.r1_reg(D(x_real), x_real), ns["r1_reg"](D2(x_real), x_real))
    G2.update_w_avg(w.mean(0), 0.9)
    torch.testing.assert_close(G2.w_avg, 0.1 * w.mean(0))
