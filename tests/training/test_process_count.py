"""Training does not depend on the number of processes: ``batch_size`` is the whole batch,
every process draws the same batch, noise, times and coupling and computes its block of
rows, and DDP's mean of the blocks' gradients is the one-process gradient of the whole batch.
Two processes (accelerate's ``debug_launcher``) end with the one-process weights up to the
order of float32 sums, while one changed draw (another seed) moves them by far more."""

import functools

import pytest
import torch

from rectdiff.data import load_data
from rectdiff.forms import VP, FlowMatching
from rectdiff.models import MLP
from rectdiff.rectify.phased import phased_loss
from rectdiff.training import TrainConfig, Trainer
from rectdiff.training.batches import draws_per_process, process_rows
from rectdiff.training.losses import diffusion_loss, with_cond_dropout

STEPS = 25


def _setup(kind: str, seed: int = 0):
    """(model, data, trainer keywords) of one case; the same on every process."""
    torch.manual_seed(0)
    x0 = load_data("moons", 512, seed=0)
    labels = torch.arange(512) % 3
    base = dict(steps=STEPS, batch_size=64, lr=1e-2, grad_clip=0.5, ema_decay=0.9, seed=seed)
    if kind == "ot":  # fresh noise re-paired by minibatch OT over the whole batch
        config = TrainConfig(**base, coupling="ot", time_sampler="logit_normal")
        return MLP(2, hidden=32, depth=2), x0, dict(form=FlowMatching(), prediction="flow",
                                                    config=config)  # fmt: skip
    if kind == "pairs":  # fixed pairs with labels, conditioning dropped at random, weighted
        eps = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
        config = TrainConfig(**base, weighting="min_snr")
        loss = with_cond_dropout(diffusion_loss, 0.3, {"class_labels": torch.tensor(3)})
        return MLP(2, hidden=32, depth=2, num_classes=3), (eps, x0, labels), dict(
            form=VP(), prediction="v", config=config, pairs=True, loss_fn=loss
        )  # fmt: skip
    if kind == "loader":  # a DataLoader: every process iterates the same seeded batches
        dataset = torch.utils.data.TensorDataset(x0, labels)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=64, shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return MLP(2, hidden=32, depth=2, num_classes=3), loader, dict(
            form=VP(), prediction="eps", config=TrainConfig(**base)
        )  # fmt: skip
    raise ValueError(kind)


def _train(kind: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], int, int]:
    """The EMA weights (what a run saves), the process index and count."""
    model, data, options = _setup(kind, seed)
    trainer = Trainer(model, data, **options)
    result = trainer.run(resume=False, progress=False)
    trainer.ema.copy_to(trainer.params)
    weights = {key: value.detach().clone() for key, value in result.model.state_dict().items()}
    acc = trainer.accelerator
    return weights, acc.process_index, acc.num_processes


def _two_process_run(kind: str, out: str) -> None:
    from accelerate.state import AcceleratorState

    # a forked worker inherits the test process's one-process state singleton
    AcceleratorState._reset_state(reset_partial_state=True)
    weights, rank, processes = _train(kind)
    torch.save({"weights": weights, "processes": processes}, f"{out}.{rank}")


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("kind", ["ot", "pairs", "loader"])
def test_two_processes_train_the_one_process_weights(tmp_path, kind):
    from accelerate import debug_launcher

    one = _train(kind)[0]
    out = str(tmp_path / "weights")
    debug_launcher(functools.partial(_two_process_run, kind, out), num_processes=2)
    two = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    assert [t["processes"] for t in two] == [2, 2]
    assert _max_diff(two[0]["weights"], two[1]["weights"]) == 0.0  # DDP keeps them equal
    gap = _max_diff(one, two[0]["weights"])
    other_seed = _max_diff(one, _train(kind, seed=1)[0])
    print(f"\n{kind}: 1 vs 2 processes {gap:.2e}; seed 0 vs seed 1 {other_seed:.2e}")
    assert gap < 1e-5
    assert other_seed > 1e-2


def test_a_batch_that_does_not_split_is_refused():
    class Two:
        num_processes, process_index = 2, 1

    assert process_rows(64, Two()) == slice(32, 64)
    with pytest.raises(ValueError, match=r"batch_size=63 does not split into 2 processes.*62"):
        process_rows(63, Two())


def test_only_a_loss_without_rows_draws_per_process():
    """The library's losses compute a block of rows of the whole batch's draws; a custom loss
    without ``rows=`` gets its rows sliced on several processes, with a warning."""

    class Processes:
        def __init__(self, n):
            self.num_processes, self.process_index = n, 0

    def no_rows(model, x0, *, form, prediction, generator=None):
        return diffusion_loss(model, x0, form=form, prediction=prediction, generator=generator)

    dropped = with_cond_dropout(diffusion_loss, 0.1, {})
    for loss in (diffusion_loss, dropped, functools.partial(phased_loss, start_mass=0.25)):
        assert not draws_per_process(loss, Processes(2))
    assert not draws_per_process(no_rows, Processes(1))
    with pytest.warns(UserWarning, match="'no_rows' takes no rows=.*depends on the number"):
        assert draws_per_process(no_rows, Processes(2))
