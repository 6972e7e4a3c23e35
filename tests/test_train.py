import pytest
import torch

from c5snn.config import load_config
from c5snn.data import prepare
from c5snn.errors import TrainingInterrupted
from c5snn.model import build_model
from c5snn.train import evaluate, train_run


def _setup(study_file, **training):
    overrides = ["d_model=64", "n_heads=2", "n_layers=2", "beta=0.8", "encoding=rate_coded"]
    overrides += [f"training.{k}={v}" for k, v in training.items()]
    config = load_config(study_file, overrides)
    params = config.model_params(config.grid_points()[0])
    data = prepare(config.data_path, config.window_size, config.split_ratios)
    return config, params, data


def test_best_epoch_weights_are_restored(study_file):
    config, params, data = _setup(study_file, epochs=4)
    result = train_run(params, config.training, data, seed=1)
    best = result.history[result.best_epoch - 1]
    assert best.improved and result.val == best.val
    later_best = max(r.val["recall_at_20"] for r in result.history)
    assert result.val["recall_at_20"] == later_best
    model = build_model(params)
    model.load_state_dict(result.model_state)
    again = evaluate(model, data, "val", 16, config.training.limit_val_batches)
    assert again.metrics == result.val


def test_early_stopping_counts_strict_improvements(study_file):
    config, params, data = _setup(study_file, epochs=30, early_stopping_patience=2)
    result = train_run(params, config.training, data, seed=3)
    assert result.epochs_run == result.best_epoch + 2 or result.epochs_run == 30
    values = [r.val["recall_at_20"] for r in result.history]
    assert all(v <= values[result.best_epoch - 1] for v in values)


def test_resume_after_interruption_is_bitwise_identical(study_file, tmp_path):
    config, params, data = _setup(study_file, epochs=4)
    straight = train_run(params, config.training, data, seed=7)
    ckpt = tmp_path / "ckpt.pt"
    batches = iter(range(10_000))
    stop_after = 2 * config.training.limit_train_batches + 1  # mid epoch 3
    with pytest.raises(TrainingInterrupted):
        train_run(params, config.training, data, seed=7, checkpoint_path=ckpt,
                  should_stop=lambda: next(batches) + 1 >= stop_after)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    replayed = []
    resumed = train_run(params, config.training, data, seed=7, checkpoint_path=ckpt,
                        on_epoch=lambda r: replayed.append((r.epoch, r.replayed)))
    assert resumed.resumed_from_epoch == 2
    assert replayed == [(1, True), (2, True), (3, False), (4, False)]
    assert resumed.val == straight.val and resumed.best_epoch == straight.best_epoch
    for key, value in straight.model_state.items():
        assert torch.equal(value, resumed.model_state[key]), key
    assert resumed.backend_changes is None  # the same backend: no note


def test_a_resume_on_another_backend_works_and_says_what_changed(study_file, tmp_path,
                                                                 monkeypatch):
    """A point stopped on one box and resumed on another (another GEMM library, thread count)
    continues from its checkpoint; the run says what changed, once, and keeps it."""
    from helpers import use_backend

    from c5snn import kernels

    if not kernels.backend().compiled:
        pytest.skip("no compiled operators here")
    config, params, data = _setup(study_file, epochs=3)
    ckpt = tmp_path / "ckpt.pt"
    batches = iter(range(10_000))
    with pytest.raises(TrainingInterrupted):
        train_run(params, config.training, data, seed=7, checkpoint_path=ckpt,
                  should_stop=lambda: next(batches) + 1 >= config.training.limit_train_batches + 1)
    saved = torch.load(ckpt, weights_only=True)["backend"]
    assert saved == kernels.describe("cpu") and saved["compiled"] is True
    other = "torch" if kernels.backend().gemm == "onednn" else "onednn"
    use_backend(monkeypatch, gemm=other, fused_linear=False)
    notes = []
    resumed = train_run(params, config.training, data, seed=7, checkpoint_path=ckpt,
                        on_backend_change=notes.append)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 3
    change = f"gemm: {saved['gemm']} -> {other}"
    assert change in resumed.backend_changes and resumed.backend["gemm"] == other
    assert len(notes) == 1 and notes[0].startswith("resuming from epoch 1, computed on another "
                                                   "backend (") and change in notes[0]


def test_test_split_only_when_asked(study_file):
    config, params, data = _setup(study_file, epochs=1)
    assert train_run(params, config.training, data, seed=1).test is None
    result = train_run(params, config.training, data, seed=1, evaluate_test=True)
    assert set(result.test) == set(result.val)


def test_bf16_training_runs_and_reports_fp32_metrics(study_file):
    config, params, data = _setup(study_file, epochs=2, precision="bf16")
    result = train_run(params, config.training, data, seed=5)
    assert result.epochs_run == 2
    assert all(v == v for r in result.history for v in [r.train_loss, *r.val.values()])  # no NaN
    assert all(p.dtype == torch.float32 for p in result.model_state.values() if p.is_floating_point())


def test_compiled_training_keeps_one_graph_per_shape_across_epochs(study_file, monkeypatch):
    """torch.compile with static shapes: the short last batch costs one graph, once.

    The backend is aot_eager (dynamo + AOT autograd tracing, eager kernels) so the test checks
    capture and recompilation, not inductor's code generation, in seconds; benchmarks/ and
    gpu_check.sh time the real inductor path.
    """
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode, dynamic: real_compile(
        model, backend="aot_eager", dynamic=dynamic))
    config, params, data = _setup(study_file, epochs=3, compile="default",
                                  limit_train_batches="null", limit_val_batches="null")
    n_train = data.splits["train"].size
    assert n_train % config.training.batch_size, "the test data must end in a short batch"
    graphs = []
    counters.clear()
    compiled = train_run(params, config.training, data, seed=9,
                         on_epoch=lambda r: graphs.append(counters["stats"]["unique_graphs"]))
    assert graphs[0] >= 2 and graphs[1:] == [graphs[0]] * 2, graphs  # no recompile after epoch 1
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per shape
    eager = build_model(params)
    eager.load_state_dict(compiled.model_state)
    again = evaluate(eager, data, "val", config.training.batch_size)
    assert again.metrics == compiled.val  # same weights, same eval numbers as the compiled net
