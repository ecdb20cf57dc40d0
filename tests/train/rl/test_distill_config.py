"""``lcr train``'s distillation settings (objectives opd / dgrpo / fkl): a teacher the objective cannot use
is refused in ``load_config``, before Megatron, servers or data, with one line naming what conflicts."""

from __future__ import annotations

import json
import shutil


from megatron_lcr.config import load_config
from megatron_lcr.train.rl.config import RLRunConfig
from tests.train.rl.test_rl_config import refused  # noqa: F401 - the same one-line check on the same tiny config

TINY = "examples/tiny/depo.yaml"  # student examples/tiny/base, rl.temperature 0.7
BASE = "examples/tiny/base"
TEACHER = f"distill.teacher.hf_path={BASE}"  # same tokenizer as the student


def test_a_teacher_is_required_and_a_usable_one_is_accepted():
    for objective in ("opd", "dgrpo", "fkl"):
        assert f"objective '{objective}' needs a teacher: set distill.teacher.hf_path" in refused([f"objective={objective}"])
        cfg = load_config(RLRunConfig, TINY, [f"objective={objective}", TEACHER])
        assert cfg.distill.teacher.hf_path == BASE
    cfg = load_config(RLRunConfig, TINY, ["objective=dgrpo", TEACHER, "distill.opd.lam=0.5", "distill.opd.mode=reward",
                                          "distill.opd.estimator=k3", "distill.teacher.temperature=0.7"])
    assert (cfg.distill.opd.lam, cfg.distill.opd.mode, cfg.distill.opd.estimator) == (0.5, "reward", "k3")
    load_config(RLRunConfig, TINY, ["objective=opd", TEACHER, "distill.opd.estimator=full"])  # Megatron teacher


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    other = tmp_path / "teacher"
    shutil.copytree(BASE, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    msg = refused(["objective=opd", f"distill.teacher.hf_path={other}"])
    assert f"teacher {other} has vocab_size {config['vocab_size'] + 8}, the student {BASE} {config['vocab_size']}" in msg


def test_a_missing_teacher_checkpoint_is_refused_naming_it(tmp_path):
    missing = tmp_path / "no_such_ckpt"
    msg = refused(["objective=opd", f"distill.teacher.load={missing}"])
    assert f"{missing}: checkpoint directory not found" in msg


def test_lam_must_be_non_negative():
    assert "distill.opd.lam must be >= 0, got -1" in refused(["objective=opd", TEACHER, "distill.opd.lam=-1"])


def test_the_exact_kl_needs_a_megatron_teacher_and_cp_1():
    full = ["objective=opd", TEACHER, "distill.opd.estimator=full"]
    msg = refused([*full, "distill.teacher.scorer=engine"])
    assert "objective 'opd' with an exact KL (estimator 'full') needs a Megatron teacher" in msg
    msg = refused([*full, "parallel.context_parallel_size=2"])
    assert "objective 'opd' with an exact KL (estimator 'full') needs parallel.cp=1" in msg
    assert "needs parallel.cp=1" in refused([*full, "trainer.logprobs_from=logits"])
    msg = refused(["objective=fkl", TEACHER, "distill.fkl.estimator=full", "distill.teacher.scorer=engine"])
    assert "objective 'fkl' with an exact KL (estimator 'full') needs a Megatron teacher" in msg


def test_an_engine_scorer_needs_distillation_at_temperature_1():
    msg = refused(["objective=dgrpo", TEACHER, "distill.teacher.scorer=engine"])  # rl.temperature 0.7
    assert ("distill.teacher.scorer='engine' (and any top-k estimator: engines give the top-k) scores at temperature 1 "
            "only, but the distillation temperature is 0.7") in msg
    load_config(RLRunConfig, TINY, ["objective=dgrpo", TEACHER, "distill.teacher.scorer=engine", "rl.temperature=1.0"])


def test_another_distillation_temperature_only_with_the_exact_kl():
    msg = refused(["objective=opd", TEACHER, "distill.teacher.temperature=1.0"])  # k1: sampled at 0.7
    assert "distill.teacher.temperature (1) differs from rl.temperature (0.7): only a KL over the distributions" in msg
    assert "differs from rl.temperature" in refused(["objective=fkl", TEACHER, "distill.teacher.temperature=1.0"])
    cfg = load_config(RLRunConfig, TINY, ["objective=opd", TEACHER, "distill.teacher.temperature=1.0",
                                          "distill.opd.estimator=full"])
    assert (cfg.distill_temperature, cfg.rl.temperature) == (1.0, 0.7)
    assert load_config(RLRunConfig, TINY, ["objective=opd", TEACHER]).distill_temperature == 0.7  # default: the rollouts'


def test_the_topk_kl_needs_an_engine_teacher_at_temperature_1_and_may_differ_from_the_rollouts():
    topk = ["objective=opd", TEACHER, "distill.opd.estimator=topk"]
    msg = refused([*topk, "distill.teacher.temperature=1.0"])  # the default scorer is the Megatron teacher
    assert "objective 'opd' with estimator 'topk' needs an engine teacher (distill.teacher.scorer: engine)" in msg
    engine = [*topk, "distill.teacher.scorer=engine"]
    assert "scores at temperature 1 only, but the distillation temperature is 0.7" in refused(engine)
    assert "with estimator 'topk' needs parallel.cp=1" in refused([*engine, "distill.teacher.temperature=1.0",
                                                                   "parallel.context_parallel_size=2"])
    # A KL over the teacher's top-k set is not a sampled-token estimate: rollouts at 0.7, distillation at 1.
    cfg = load_config(RLRunConfig, TINY, [*engine, "distill.teacher.temperature=1.0", "distill.opd.top_k=8"])
    assert (cfg.distill_temperature, cfg.rl.temperature, cfg.distill.opd.top_k) == (1.0, 0.7, 8)
    # The warmup's top-k comes from the servers that sample it, whatever the scorer; at temperature 1 only.
    warmup = ["objective=fkl", TEACHER, "distill.fkl.estimator=topk"]
    assert "scores at temperature 1 only, but the distillation temperature is 0.7" in refused(warmup)
    load_config(RLRunConfig, TINY, [*warmup, "distill.teacher.temperature=1.0"])


def test_the_warmup_accepts_running_teacher_servers():
    # Servers given by URL: nothing to launch and no directory to compare tokenizers with.
    cfg = load_config(RLRunConfig, TINY, ["objective=fkl", "distill.teacher.engine.urls=[http://127.0.0.1:9]"])
    assert cfg.distill.teacher.engine.urls == ["http://127.0.0.1:9"] and cfg.distill.fkl.estimator == "sampled"


def test_the_forward_kl_warmup_refuses_penalties_it_would_ignore():
    for key in ("rl.loss.kl_coef=0.1", "rl.loss.entropy_coef=0.01"):
        assert "objective 'fkl' has no KL penalty or entropy bonus" in refused(["objective=fkl", TEACHER, key])


def test_the_tiny_distillation_examples_resolve_with_the_shipped_teacher():
    from megatron_lcr.pipeline.config import PipelineConfig
    from megatron_lcr.pipeline.run import validate_pipeline

    for name, objective in (("opd", "opd"), ("dgrpo", "dgrpo")):
        cfg = load_config(RLRunConfig, f"examples/tiny/{name}.yaml", [])
        assert (cfg.objective, cfg.distill.teacher.hf_path, cfg.distill.opd.estimator) == \
            (objective, "examples/tiny/teacher", "full")
        assert cfg.rl.context == "long" and cfg.distill_temperature == cfg.rl.temperature
    pipeline = load_config(PipelineConfig, "examples/tiny/sparse_to_dense.yaml", [])
    validate_pipeline(pipeline)  # every stage's lcr train config resolves, and the input models exist
    assert (pipeline.student, pipeline.teacher) == ("examples/tiny/base", "examples/tiny/teacher")
    assert pipeline.stages.student_rl.skip and not pipeline.stages.opd.skip


def test_a_teacher_with_its_own_layout_needs_hf_weights_a_megatron_scorer_and_cp_1(tmp_path):
    own = ["objective=opd", TEACHER, "distill.opd.estimator=full", "distill.teacher.tensor_parallel_size=2"]
    assert load_config(RLRunConfig, TINY, own).distill.teacher.tensor_parallel_size == 2
    for extra in (["distill.teacher.scorer=engine", "rl.temperature=1.0"], ["parallel.context_parallel_size=2"]):
        assert "distill.teacher.tensor_parallel_size (a Megatron teacher with its own layout) needs" in refused(own + extra)
    assert "distill.teacher.tensor_parallel_size must be >= 1, got 0" in refused(
        ["objective=opd", TEACHER, "distill.teacher.tensor_parallel_size=0"])
    assert "distill.teacher.pipeline_parallel_size (2) must be >= 1, and other than 1 only with" in refused(
        ["objective=opd", TEACHER, "distill.teacher.pipeline_parallel_size=2"])
    cfg = load_config(RLRunConfig, TINY, [*own, "distill.teacher.pipeline_parallel_size=2"])
    assert (cfg.distill.teacher.tensor_parallel_size, cfg.distill.teacher.pipeline_parallel_size) == (2, 2)
