"""fusedopt inside the trainers people use: Hugging Face's Trainer and Lightning, each run
with fusedopt and with torch.optim on the same model, data and seed, and compared.

Oracles. HF: ``torch.optim.AdamW(fused=True)``. torch's own implementations already part
after a few dozen Adam steps (here its for-loop and fused AdamW end ~1e-5 apart on the
GPT-2 in float32 and ~1e-2 under bf16 autocast: one-ulp differences that Adam's
normalisation amplifies where a grad is near zero, and bf16 rounding of the activations);
fusedopt computes what torch's fused kernel computes (bit for bit here), so it is held to
that one tightly. Lightning under mixed precision with clipping refuses torch's fused
optimizers (what fusedopt.lightning works around), so there the oracle is torch's default
AdamW, on a model small enough that the two stay within float rounding.
"""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fusedopt


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only spins, and on a loaded machine costs 4x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# --- Hugging Face Trainer ------------------------------------------------------------------
def hugging_face():
    """transformers, whose Trainer needs accelerate (both in requirements-frameworks.txt):
    a test that needs them skips where they are not installed."""
    pytest.importorskip("accelerate")
    return pytest.importorskip("transformers")


HF_STEPS, HF_CHECKPOINT_STEP = 24, 10  # the checkpoint falls mid-epoch (12 batches an epoch)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 256, (96, 32), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_train(make_optimizer, out, *, bf16=False, resume_from_checkpoint=None):
    """A tiny GPT-2 (random weights, tied embeddings) trained by Trainer with the given
    optimizer and a warmup-then-linear schedule; returns (final params, the losses of every
    step, steps this call ran)."""
    transformers = hugging_face()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    opt = make_optimizer(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=HF_STEPS)
    args = transformers.TrainingArguments(
        str(out), max_steps=HF_STEPS, per_device_train_batch_size=8, save_steps=HF_CHECKPOINT_STEP,
        logging_steps=1, bf16=bf16, use_cpu=True, seed=0, report_to="none", disable_tqdm=True)
    steps_run = []

    class CountSteps(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=(opt, sched),
                                   callbacks=[CountSteps()])
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    losses = torch.tensor([log["loss"] for log in trainer.state.log_history if "loss" in log])
    return [p.detach().clone() for p in model.parameters()], losses, len(steps_run)


def torch_fused_adamw(params, **kwargs):
    return torch.optim.AdamW(params, fused=True, **kwargs)


def max_abs_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_hf_trainer_with_fusedopt_adamw_trains_as_torch_adamw(tmp_path, bf16):
    torch_params, torch_losses, _ = hf_train(torch_fused_adamw, tmp_path / "torch", bf16=bf16)
    fused_params, fused_losses, steps_run = hf_train(fusedopt.AdamW, tmp_path / "fused", bf16=bf16)
    assert steps_run == len(fused_losses) == HF_STEPS
    torch.testing.assert_close(fused_losses, torch_losses, rtol=0, atol=1e-6)
    for fused, reference in zip(fused_params, torch_params):
        torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-7)


def test_hf_trainer_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    torch_params, _, _ = hf_train(torch_fused_adamw, tmp_path / "torch")
    whole_params, whole_losses, _ = hf_train(fusedopt.AdamW, tmp_path / "whole")
    checkpoint = tmp_path / "whole" / f"checkpoint-{HF_CHECKPOINT_STEP}"
    resumed_params, resumed_losses, steps_run = hf_train(fusedopt.AdamW, tmp_path / "resumed",
                                                         resume_from_checkpoint=str(checkpoint))
    # It did resume (a fresh run from the same seed would end in the same place too).
    assert steps_run == HF_STEPS - HF_CHECKPOINT_STEP
    assert torch.equal(resumed_losses, whole_losses)
    for resumed, whole in zip(resumed_params, whole_params):
        assert torch.equal(resumed, whole)
    for whole, reference in zip(whole_params, torch_params):
        torch.testing.assert_close(whole, reference, rtol=1e-6, atol=1e-7)


# --- Lightning ----------------------------------------------------------------------------
CLIP = 0.5  # below every step's grad norm here: clipping acts on each step


def lightning():
    """A test that needs Lightning (requirements-frameworks.txt) skips where it is not
    installed: call this before anything imports from it."""
    return pytest.importorskip("lightning")


def lightning_module(make_optimizer, manual_clip=None):
    """With ``manual_clip``: manual optimization that clips by norm through
    ``self.clip_gradients`` (Lightning hands the precision plugin its optimizer wrapper)."""
    L = lightning()

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
            self.grad_norms = []  # before clipping, as Lightning shows them to this hook
            self.losses = []
            self.automatic_optimization = manual_clip is None

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
            self.losses.append(loss.detach())
            if manual_clip is None:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            self.grad_norms.append(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()]))
            self.clip_gradients(opt, gradient_clip_val=manual_clip, gradient_clip_algorithm="norm")
            opt.step()
            self.lr_schedulers().step()

        def on_before_optimizer_step(self, optimizer):
            if self.automatic_optimization:
                self.grad_norms.append(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()]))

        def configure_optimizers(self):
            opt = make_optimizer(self.parameters(), lr=1e-2, weight_decay=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regression()


def regression_data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(64, 16, generator=g), 10 * torch.randn(64, 4, generator=g))


def lightning_fit(make_optimizer, root, *, epochs=3, ckpt_path=None, checkpoint_every_epoch=False, manual_clip=None,
                  **trainer_kwargs):
    L = lightning()
    module = lightning_module(make_optimizer, manual_clip)
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)] \
        if checkpoint_every_epoch else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, default_root_dir=root, logger=False,
                        enable_checkpointing=checkpoint_every_epoch, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, DataLoader(regression_data(), batch_size=8), ckpt_path=ckpt_path)
    return module, trainer


def torch_precision(precision, scaler=None):
    """What a torch.optim user passes: the precision string, except that Lightning turns
    '16-mixed' into bf16 on the CPU, so float16 with a GradScaler needs its plugin."""
    lightning()
    if precision == "16-mixed":
        from lightning.pytorch.plugins.precision import MixedPrecision
        return dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    return dict(precision=precision)


def fused_precision(precision, scaler=None):
    lightning()
    if precision == "32-true":
        return dict(precision=precision)
    from fusedopt.lightning import MixedPrecision
    return dict(plugins=[MixedPrecision(precision, "cpu", scaler)])


def overflowing_scaler():
    # Starts far too high (float16 overflows, GradScaler skips the step and backs off)
    # and grows every 2 steps: skipped steps all through the run.
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 20, growth_interval=2)


def optimizer_steps_taken(opt):
    return {int(opt.state[p]["step"]) for group in opt.param_groups for p in group["params"]}


def assert_same_fit(torch_module, fused_module, torch_trainer, fused_trainer):
    torch_opt, fused_opt = torch_trainer.optimizers[0], fused_trainer.optimizers[0]
    assert optimizer_steps_taken(fused_opt) == optimizer_steps_taken(torch_opt)
    torch.testing.assert_close(torch.stack(fused_module.losses), torch.stack(torch_module.losses), rtol=1e-5, atol=0)
    for fused, reference in zip(fused_module.parameters(), torch_module.parameters()):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_lightning_fit_with_gradient_clipping_matches_torch_adamw(tmp_path, precision):
    """Clipping by norm on every step (in 32-true with gradients accumulated over 2
    batches), with fusedopt.lightning.MixedPrecision under AMP (Lightning's own plugin
    refuses fusedopt there)."""
    scalers = (overflowing_scaler(), overflowing_scaler()) if precision == "16-mixed" else (None, None)
    accumulate = 2 if precision == "32-true" else 1
    torch_module, torch_trainer = lightning_fit(
        torch.optim.AdamW, tmp_path / "torch", gradient_clip_val=CLIP, accumulate_grad_batches=accumulate,
        **torch_precision(precision, scalers[0]))
    fused_module, fused_trainer = lightning_fit(
        fusedopt.AdamW, tmp_path / "fused", gradient_clip_val=CLIP, accumulate_grad_batches=accumulate,
        **fused_precision(precision, scalers[1]))
    assert min(n for n in torch_module.grad_norms if n.isfinite()) > CLIP  # the clip acted on every step
    assert fused_trainer.global_step == torch_trainer.global_step == 3 * 8 // accumulate
    if precision == "16-mixed":
        assert fused_trainer.precision_plugin.scaler.get_scale() == torch_trainer.precision_plugin.scaler.get_scale()
        assert max(optimizer_steps_taken(fused_trainer.optimizers[0])) < fused_trainer.global_step  # some skipped
    assert_same_fit(torch_module, fused_module, torch_trainer, fused_trainer)


def test_lightning_manual_optimization_clip_gradients_under_bf16_mixed_matches_torch_adamw(tmp_path):
    torch_module, torch_trainer = lightning_fit(torch.optim.AdamW, tmp_path / "torch", manual_clip=CLIP,
                                                **torch_precision("bf16-mixed"))
    fused_module, fused_trainer = lightning_fit(fusedopt.AdamW, tmp_path / "fused", manual_clip=CLIP,
                                                **fused_precision("bf16-mixed"))
    assert min(torch_module.grad_norms) > CLIP
    assert_same_fit(torch_module, fused_module, torch_trainer, fused_trainer)


def test_lightning_16_mixed_without_clipping_needs_no_plugin_and_matches_torch_adamw(tmp_path):
    """Lightning's own 16-mixed plugin, no clipping: GradScaler.step drives fusedopt's
    kernel (which unscales, and skips the overflowing steps) as it drives torch.optim."""
    torch_module, torch_trainer = lightning_fit(torch.optim.AdamW, tmp_path / "torch",
                                                **torch_precision("16-mixed", overflowing_scaler()))
    fused_module, fused_trainer = lightning_fit(fusedopt.AdamW, tmp_path / "fused",
                                                **torch_precision("16-mixed", overflowing_scaler()))
    assert max(optimizer_steps_taken(fused_trainer.optimizers[0])) < fused_trainer.global_step  # some skipped
    assert_same_fit(torch_module, fused_module, torch_trainer, fused_trainer)


def test_lightning_clipping_by_value_under_16_mixed_matches_torch_adamw(tmp_path):
    torch_module, torch_trainer = lightning_fit(
        torch.optim.AdamW, tmp_path / "torch", gradient_clip_val=0.05, gradient_clip_algorithm="value",
        **torch_precision("16-mixed", overflowing_scaler()))
    fused_module, fused_trainer = lightning_fit(
        fusedopt.AdamW, tmp_path / "fused", gradient_clip_val=0.05, gradient_clip_algorithm="value",
        **fused_precision("16-mixed", overflowing_scaler()))
    assert_same_fit(torch_module, fused_module, torch_trainer, fused_trainer)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_lightning_resume_from_checkpoint_equals_the_uninterrupted_fit(tmp_path, precision):
    """A checkpoint holds fusedopt's state (and under 16-mixed the GradScaler's): a fit
    resumed from epoch 2 of 4 ends exactly where the uninterrupted fit does."""
    torch_module, torch_trainer = lightning_fit(
        torch.optim.AdamW, tmp_path / "torch", epochs=4, gradient_clip_val=CLIP,
        **torch_precision(precision, overflowing_scaler()))
    whole_module, whole_trainer = lightning_fit(
        fusedopt.AdamW, tmp_path / "whole", epochs=4, gradient_clip_val=CLIP, checkpoint_every_epoch=True,
        **fused_precision(precision, overflowing_scaler()))
    checkpoint = tmp_path / "whole" / "ckpt" / "epoch=1-step=16.ckpt"
    resumed_module, resumed_trainer = lightning_fit(
        fusedopt.AdamW, tmp_path / "resumed", epochs=4, gradient_clip_val=CLIP, ckpt_path=checkpoint,
        **fused_precision(precision, overflowing_scaler()))
    assert len(resumed_module.grad_norms) == 16  # it did resume: epochs 3 and 4 only
    for resumed, whole in zip(resumed_module.parameters(), whole_module.parameters()):
        assert torch.equal(resumed, whole)
    assert_same_fit(torch_module, whole_module, torch_trainer, whole_trainer)


def test_clip_grad_norm_through_lightnings_optimizer_wrapper_clips_the_step():
    # self.optimizers() in a LightningModule is a LightningOptimizer: a subclass of the
    # optimizer's class whose attribute writes land on the wrapper. The clip must still
    # reach the step of the optimizer it wraps, as torch.nn.utils.clip_grad_norm_ does.
    LightningOptimizer = lightning().pytorch.core.optimizer.LightningOptimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    expected = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.SGD(expected, lr=0.1, foreach=False)
    opt = fusedopt.SGD(params, lr=0.1)
    for p, e in zip(params, expected):
        p.grad = torch.randn_like(p) * 10
        e.grad = p.grad.clone()
    norm = LightningOptimizer(opt).clip_grad_norm_(1.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(expected, 1.0)
    opt.step()
    ref.step()
    torch.testing.assert_close(norm, expected_norm)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e)
