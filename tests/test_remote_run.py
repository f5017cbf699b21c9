"""FedPT with the large LM as a black box behind ``fedpt serve`` (``model.large_backend = "remote"``):
the same run as with the local large LM, and one clear error with the last checkpoint intact when
the service goes away."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedpt.checkpoint import load_checkpoint
from fedpt.cli import main
from fedpt.config import load_config
from fedpt.errors import FedPTError

from .conftest import FEDPT_2_ROUNDS as FAST
from .test_serve import start_server

KEYS = ("train_loss", "kd_loss", "kd_kl_before", "kd_kl_after", "rougeL_small", "rougeL_proxy", "clients")


@pytest.fixture(scope="module")
def large_service(fedpt_home, request):
    """tiny-large served in fp32 as the tiny preset loads it, with as many threads as the local run."""
    served = start_server(["--model", "tiny-large", "--dtype", "float32", "--threads", "0"], fedpt_home)
    request.addfinalizer(served.stop)
    proc, url = served.process, served.url
    return proc, url


def rounds(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(large_service, local_fedpt_run, tmp_path_factory):
    """The same 2-round FedPT run with the local large LM and with the large LM behind the service."""
    proc, url = large_service
    local, remote = local_fedpt_run, tmp_path_factory.mktemp("remote")
    assert main(["run", "--preset", "tiny", "--no-progress", "--overwrite", "--out", str(remote), *FAST,
                 "--set", "model.large_backend=remote", "--set", f"model.large_url={url}"]) == 0
    return local, remote


@pytest.mark.slow
def test_remote_backend_run_equals_local_run_then_service_outage(large_service, two_runs, monkeypatch, capsys,
                                                                fedpt_home, request):
    local, remote = two_runs
    a, b = rounds(local), rounds(remote)
    assert [r["round"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):  # same seeds, same logits (fp32 on the wire): the same run
        for key in KEYS:
            if isinstance(x[key], float):
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["round"], key)
            else:
                assert y[key] == x[key], (x["round"], key)
    adapter_a = load_file(local / "fedpt" / "adapter" / "adapter_model.safetensors")
    adapter_b = load_file(remote / "fedpt" / "adapter" / "adapter_model.safetensors")
    for key in adapter_a:
        torch.testing.assert_close(adapter_b[key], adapter_a[key], atol=1e-5, rtol=1e-4)

    # The service goes away in the middle of round 3's evaluation (it was up for the preflight):
    # bounded retries, one error line, and round 2's checkpoint untouched.
    # A service of its own that this test stops (the module's service stays up for the other tests);
    # a resume may point at another URL.
    served = start_server(["--model", "tiny-large", "--dtype", "float32", "--threads", "0"], fedpt_home)
    request.addfinalizer(served.stop)
    proc, url = served.process, served.url
    config = load_config(path=remote / "config.toml")
    config.federation.rounds = 3  # resuming with more rounds continues the same run
    config.model.large_url = url
    config.save(remote / "config.toml")
    import fedpt.federation.strategy as strategy
    from fedpt.models import remote as remote_module

    monkeypatch.setattr(remote_module.RetryPolicy, "__init__", _fast_retries)
    real_kill_point = strategy.kill_point

    def outage_at_evaluation(point: str, server_round: int) -> None:
        if (point, server_round) == ("evaluation", 3):
            served.stop()  # between scoring the small LM and the proxy-tuned large LM
        real_kill_point(point, server_round)

    monkeypatch.setattr(strategy, "kill_point", outage_at_evaluation)
    capsys.readouterr()
    assert main(["run", "--no-progress", "--resume", str(remote)]) == 2
    assert proc.poll() is not None, "the outage was never triggered"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert errors[0].startswith(f"error: round 3: evaluation failed: the logits service at {url} did not answer "
                                "after 3 tries"), errors[0]
    assert errors[0].endswith(f"the last checkpoint is intact: fedpt run --resume {remote}"), errors[0]
    assert load_checkpoint(remote / "fedpt" / "checkpoints").round == 2
    # still down: the preflight says so before anything is touched
    assert main(["run", "--no-progress", "--resume", str(remote)]) == 2
    assert "did not answer" in capsys.readouterr().err
    assert load_checkpoint(remote / "fedpt" / "checkpoints").round == 2


def _fast_retries(self, attempts: int = 3, backoff: float = 0.05, timeout: float = 60.0) -> None:
    self.attempts, self.backoff, self.timeout = 3, backoff, timeout


def test_remote_backend_config_checks(tmp_path):
    with pytest.raises(FedPTError, match="needs model.large_url"):
        load_config(preset="tiny", overrides=["model.large_backend=remote"])
    with pytest.raises(FedPTError, match="fedavg-large tunes the large LM's weights"):
        load_config(preset="tiny", overrides=["model.large_backend=remote", "model.large_url=http://127.0.0.1:9"])
    with pytest.raises(FedPTError, match="large_backend"):
        load_config(preset="tiny", overrides=["model.large_backend=cloud"])
    cfg = load_config(preset="tiny", overrides=["model.large_backend=openai", "model.large_url=http://127.0.0.1:9",
                                                "run.systems=['fedpt']"])
    assert cfg.model.large_backend == "openai"


def test_preflight_checks_the_service_vocabulary(large_service, fedpt_home, tmp_path, capsys):
    """A service whose vocabulary differs from the small LM's tokenizer is refused before the run starts."""
    proc, url = large_service
    from fedpt.models.remote import check_remote_vocabulary

    assert check_remote_vocabulary(url, "", "tiny-small")["model"] == "tiny-large"
    import shutil

    from fedpt.models.loading import load_tokenizer, resolve_spec

    other = tmp_path / "other-small"  # tiny-small with one token more: a different vocabulary
    shutil.copytree(resolve_spec("tiny-small").path, other)
    tokenizer = load_tokenizer(str(other))
    tokenizer.add_tokens(["<|not-in-the-large-vocabulary|>"])
    tokenizer.save_pretrained(other)
    load_tokenizer.cache_clear()
    with pytest.raises(FedPTError, match="different vocabulary"):
        check_remote_vocabulary(url, "", str(other))


@pytest.mark.slow
def test_serve_a_runs_proxy_tuned_lm(two_runs, fedpt_home, request):
    """``fedpt serve --run``: greedy answers equal the proxy arithmetic done by hand (full re-forwards
    of the large LM and of the small LM with and without its adapter); alpha per request, 0 = large."""
    from peft import PeftModel

    from fedpt.models.loading import load_model, load_tokenizer

    from .test_serve import PROMPT

    local, _ = two_runs
    served = start_server(["--run", str(local)], fedpt_home)
    request.addfinalizer(served.stop)
    url = served.url
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    name = client.models.list().data[0].id
    assert name == f"{local.name}/fedpt"
    tokenizer = load_tokenizer("tiny-small")
    large = load_model("tiny-large", "float32")
    small = PeftModel.from_pretrained(load_model("tiny-small", "float32"), local / "fedpt" / "adapter").eval()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    from fedpt.proxy import stop_token_ids

    stop_ids = set(stop_token_ids(tokenizer))

    def by_hand(alpha: float, n: int = 6) -> list[int]:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(n):
                x = torch.tensor([seq])
                z = large(x).logits[0, -1]
                tuned = small(x).logits[0, -1]
                with small.disable_adapter():
                    base = small(x).logits[0, -1]
                seq.append(int((z + alpha * (tuned - base)).argmax()))
                if seq[-1] in stop_ids:  # the server stops there (the EOS token is in its logprobs)
                    break
        return seq[len(ids):]

    for alpha in (None, 0.0, 2.0):
        extra = {"return_tokens_as_token_ids": True} | ({"alpha": alpha} if alpha is not None else {})
        out = client.completions.create(model=name, prompt=ids, max_tokens=6, temperature=0, logprobs=0,
                                        extra_body=extra)
        expected = by_hand(1.0 if alpha is None else alpha)  # the run's proxy.alpha is 1.0
        assert out.choices[0].logprobs.tokens == [f"token_id:{t}" for t in expected], alpha


def test_server_steps_with_the_remote_backend_equal_the_local_ones(large_service, fedpt_home):
    """What the backend changes, without a Flower simulation: the server's proxy-tuning, distillation
    and evaluation with the large LM behind ``fedpt serve`` equal those with the large LM in-process
    (fp32 on the wire), from the same non-trivial small adapter."""
    from fedpt.server import ServerModels, load_splits

    _, url = large_service
    overrides = ["data.eval_size=8", "data.kd_pool_size=8", "eval.max_new_tokens=8", "distill.max_new_tokens=8",
                 "distill.steps=2", "run.systems=['fedpt']"]
    local_cfg = load_config(preset="tiny", overrides=overrides)
    remote_cfg = load_config(preset="tiny", overrides=[*overrides, "model.large_backend=remote",
                                                       f"model.large_url={url}"])
    results = []
    for cfg in (local_cfg, remote_cfg):
        server = ServerModels.load(cfg, load_splits(cfg), large_trainable=False)
        assert (server.large is None) == (cfg is remote_cfg)  # the remote backend loads no large weights
        generator = torch.Generator().manual_seed(0)
        adapter = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in server.initial["small"].items()}
        server.load_adapter("small", adapter)
        before = server.evaluate(server.proxy_tune())
        distilled = server.distill(server_round=1)
        results.append((before, distilled, server.adapter_state("small")))
    (eval_a, kd_a, state_a), (eval_b, kd_b, state_b) = results
    assert {k: (v.rouge_l, v.samples) for k, v in eval_a.items()} == {k: (v.rouge_l, v.samples) for k, v in eval_b.items()}
    assert kd_b.loss == pytest.approx(kd_a.loss, rel=1e-5) and kd_b.kl_before == pytest.approx(kd_a.kl_before, rel=1e-5)
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], atol=1e-6, rtol=1e-5)
