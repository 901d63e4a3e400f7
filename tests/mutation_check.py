"""Mutation check: does each script's test file catch plausible bugs? Run by hand, not in CI
(minutes; pytest does not collect it: its name does not start with test_).

    OMP_NUM_THREADS=1 python tests/mutation_check.py -x       # all bugs; -x: stop at a failure
    python tests/mutation_check.py -x --only 02 --only ema    # bugs whose name holds "02" or "ema"
    python tests/mutation_check.py --list                     # the bugs, nothing run

Every bug is one exact-string replacement in one file: the lines a student "simplifying" the code
might write. The repo (tracked and untracked files, the toy data; no runs or caches) is copied once
to a temporary folder, where each test file involved must first pass unchanged; then for each bug
the file is changed there, the script's own test file runs against it, and the file is restored.
A table follows: bug, script, caught, by which test, seconds.
Exit status 1 if a bug survives, or at once, before anything runs, if a planted string is not found
exactly once: a refactor moved it, so update BUGS rather than lose the check silently.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = {"01": "tests/test_01_stargan_v1.py", "02": "tests/test_02_stargan_v2.py",
         "03": "tests/test_03_bicyclegan_latent.py", "04": "tests/test_04_stylegan_mapping.py"}
FILES = {"01": "01_stargan_v1.py", "02": "02_stargan_v2.py", "03": "03_bicyclegan_latent.py",
         "04": "04_stylegan_mapping.py"}

# (name, script, old, new): `old` must occur exactly once in the script.
BUGS = [
    # ---- the ten of issue 26: each passed the whole test file before
    ("R1 added without its weight λ_reg", "02",
     "loss = loss_real + loss_fake + cfg.lambda_reg * loss_reg",
     "loss = loss_real + loss_fake + loss_reg"),
    ("train_step's EMA with 1 - β", "02",
     "ema_update(ema, nets, cfg.ema_beta)  # 5.", "ema_update(ema, nets, 1 - cfg.ema_beta)  # 5."),
    ("train_step never updates the EMA", "02",
     "    ema_update(ema, nets, cfg.ema_beta)  # 5. EMA of G, F, E\n", ""),
    ("train_step uses λ_ds, not the decayed one", "02",
     "lambda_ds = lambda_ds_at(step, cfg)", "lambda_ds = cfg.lambda_ds"),
    ("train() resumes without the optimizers", "02",
     'load_checkpoint(resume, all_nets, optims)["step"]',
     'load_checkpoint(resume, all_nets)["step"]'),
    ("R1 dropped from D's loss", "04",
     "(loss_adv + cfg.r1_gamma / 2 * loss_r1).backward()", "loss_adv.backward()"),
    ("w̄ update with β and 1 - β swapped", "04",
     "w_mean.to(self.w_avg.dtype), 1 - beta)", "w_mean.to(self.w_avg.dtype), beta)"),
    ("gradient penalty dropped from D's loss", "01",
     "loss = loss_adv + cfg.lambda_gp * loss_gp + cfg.lambda_cls * loss_cls",
     "loss = loss_adv + cfg.lambda_cls * loss_cls"),
    ("λ_rec · L_rec dropped from G's loss", "01",
     "loss = loss_adv + cfg.lambda_cls * loss_cls + cfg.lambda_rec * loss_rec",
     "loss = loss_adv + cfg.lambda_cls * loss_cls"),
    ("D's LSGAN targets swapped (real 0, fake 1)", "03",
     "lsgan_loss(D(fake.detach()), 0.0) + lsgan_loss(D(real), 1.0)",
     "lsgan_loss(D(fake.detach()), 1.0) + lsgan_loss(D(real), 0.0)"),
    # ---- more of the same kind
    ("L_cls^r unweighted in D's loss", "01",
     "cfg.lambda_gp * loss_gp + cfg.lambda_cls * loss_cls", "cfg.lambda_gp * loss_gp + loss_cls"),
    ("train() never decays the lr", "01",
     'optim.param_groups[0]["lr"] = lr_at(step, lr0, cfg)', 'optim.param_groups[0]["lr"] = lr0'),
    ("target labels = source labels", "01",
     "c_trg = shard_draw(lambda n: c_all[torch.randperm(n, device=c_org.device)], len(c_org))",
     "c_trg = c_org"),
    ("a G step every iteration (no n_critic)", "01",
     "if (step + 1) % cfg.n_critic == 0:", "if True:"),
    ("cycle back with the target style", "02",
     "cycle_loss(nets.G(x_fake, s_org,", "cycle_loss(nets.G(x_fake, s_trg,"),
    ("style reconstruction against s_trg2", "02",
     "style_rec_loss(nets.E(x_fake, y_trg), s_trg)",
     "style_rec_loss(nets.E(x_fake, y_trg), s_trg2)"),
    ("the reference D step judges x_ref2's style", "02",
     '("ref", dict(x_ref=x_ref))', '("ref", dict(x_ref=x_ref2))'),
    ("F trained at G's lr", "02",
     'lr=cfg.f_lr if n == "mapping" else', 'lr=cfg.lr if n == "mapping" else'),
    ("λ_KL dropped", "03",
     'loss["kl"] = cfg.lambda_kl * kl_loss(', 'loss["kl"] = kl_loss('),
    ("train() never decays the lr", "03",
     'group["lr"] = lr_at(step, cfg)', 'group["lr"] = cfg.lr'),
    ("D2 trained on the encoded fakes", "03",
     'opts["D2"], fw["B_rand"], fw["x_rand"])', 'opts["D2"], fw["B_rand"], fw["x_enc"])'),
    ("style mixing never happens", "04",
     "if torch.rand(()) < cfg.mixing_prob:", "if False:"),
    ("R1 weighted by γ, not γ/2", "04",
     "cfg.r1_gamma / 2 * loss_r1).backward()", "cfg.r1_gamma * loss_r1).backward()"),
    ("train() never updates the EMA", "04",
     "            ema_update(G_ema, G, cfg)\n            step += 1\n", "            step += 1\n"),
]


def check_strings(bugs):
    """Every planted string occurs exactly once, or nothing runs."""
    bad = []
    for name, script, old, _ in bugs:
        n = (ROOT / FILES[script]).read_text().count(old)
        if n != 1:
            bad.append(f"  {script} {name!r}: found {n} times (want 1): {old!r}")
    if bad:
        sys.exit("mutation_check: planted strings not found exactly once; update BUGS in "
                 f"{Path(__file__).name}:\n" + "\n".join(bad))


def copy_repo(dst):
    """Tracked and untracked (not ignored) files, plus the generated toy data (saves minutes)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in listed:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    if (ROOT / "data" / "toy").is_dir():
        shutil.copytree(ROOT / "data" / "toy", dst / "data" / "toy", dirs_exist_ok=True)


def run_tests(repo, script, stop_first, timeout):
    """The script's test file in `repo` -> (pytest's exit status or "timeout", failed tests)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           "-o", "addopts=", "-m", "not cuda", TESTS[script]] + (["-x"] if stop_first else [])
    try:
        res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired:
        out, rc = "", "timeout"
    failed = re.findall(r"^(?:FAILED|ERROR) \S+::(\S+)", out, re.M)
    if rc not in (0, 1, "timeout"):  # 2-5: collection error, usage error, no tests
        failed = failed or [f"pytest exit {rc}: " + (out.strip().splitlines() or [""])[-1][:60]]
    return rc, failed


def run_one(repo, bug, stop_first, timeout):
    """Plant the bug, run its script's test file, restore. -> (caught, tests that failed, s)."""
    name, script, old, new = bug
    path = repo / FILES[script]
    original, t0 = path.read_text(), time.time()
    path.write_text(original.replace(old, new, 1))
    try:
        rc, failed = run_tests(repo, script, stop_first, timeout)
    finally:
        path.write_text(original)
    return rc != 0, failed, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-x", action="store_true", help="stop each test file at its first failure")
    ap.add_argument("--only", action="append", default=[],
                    help="run the bugs whose script or name contains this (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the bugs and exit")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per bug")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the test files unchanged first")
    ns = ap.parse_args()
    bugs = [b for b in BUGS if not ns.only or any(s in f"{b[1]} {b[0]}" for s in ns.only)]
    check_strings(BUGS)  # all of them, whatever runs: a moved string is news
    if ns.list or not bugs:
        for name, script, old, new in bugs:
            print(f"{script}  {name}\n      {old!r}\n   -> {new!r}")
        return 0
    rows, t_all = [], time.time()
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        copy_repo(Path(tmp))
        for script in sorted({b[1] for b in bugs}) if not ns.no_baseline else ():
            # A test file that fails unchanged would report every bug of its script as caught.
            rc, failed = run_tests(Path(tmp), script, True, ns.timeout)
            print(f"{script}  baseline  {'passes' if rc == 0 else 'FAILS: ' + ', '.join(failed)}",
                  flush=True)
            if rc != 0:
                sys.exit(f"mutation_check: {TESTS[script]} fails without any bug; fix it first")
        for bug in bugs:
            caught, failed, secs = run_one(Path(tmp), bug, ns.x, ns.timeout)
            rows.append((bug[0], bug[1], "yes" if caught else "NO", ", ".join(failed[:3]), secs))
            print(f"{bug[1]}  {'caught' if caught else 'SURVIVED':8}  {secs:6.1f} s  {bug[0]}"
                  + (f"  ({rows[-1][3]})" if failed else ""), flush=True)
    print("\n| bug | script | caught | by | s |\n|---|---|---|---|---|")
    for name, script, caught, by, secs in rows:
        print(f"| {name} | {script} | {caught} | {by or '-'} | {secs:.0f} |")
    survived = sum(r[2] == "NO" for r in rows)
    print(f"\n{len(rows) - survived}/{len(rows)} caught in {time.time() - t_all:.0f} s")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
